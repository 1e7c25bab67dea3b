//go:build illumos

package propolis

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// NewHostProvisioner returns the provisioner that makes each VM's zvol and
// VNIC and runs its own propolis-server on this illumos host.
func NewHostProvisioner(o HostOptions) (Provisioner, error) {
	return newHost(o, execRunner{})
}

// execRunner runs host commands with os/exec.
type execRunner struct{}

func (execRunner) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Spawn starts a daemon in its own process group, so it outlives the
// worker and ignores the worker's terminal signals. One goroutine waits for
// it, so it never lingers as a zombie while the worker runs.
func (execRunner) Spawn(logPath, name string, args ...string) (int, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	go func() { _ = cmd.Wait() }()
	return cmd.Process.Pid, nil
}

func (execRunner) Signal(pid int, sig syscall.Signal) error { return syscall.Kill(pid, sig) }
