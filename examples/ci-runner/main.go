// ci-runner runs one CI job in a fresh VM, using only vmherd's public
// packages: it creates a VM from an image with a throw-away SSH key,
// prints the VM's events as they are stored, waits until the guest's SSH
// server answers through vmherd's tunnel, runs the command there, destroys
// the VM, and exits with the command's exit status.
//
//	NATS_URL=nats://127.0.0.1:4222 NATS_CREDS=ci.creds \
//	    ci-runner -name job-42 -image debian-12 -- make test
//
// It exits 1 when vmherd says no (the typed error is printed), 2 on bad
// usage. The VM is destroyed whatever happens, so the next job can reuse
// its name.
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
)

func main() { os.Exit(run()) }

func run() int {
	name := flag.String("name", "ci-job", "the VM's name (reused by the next job once this one is destroyed)")
	image := flag.String("image", "", "the guest image: a file on the VM's host, or a name in its image store")
	backend := flag.String("backend", "qemu", "the backend (qemu, propolis, noop)")
	memory := flag.Int("memory", 0, "memory in MiB (0: the engine's default)")
	user := flag.String("user", "ci", "the user created in the guest for the job")
	timeout := flag.Duration("timeout", 10*time.Minute, "the longest the job may take, VM included")
	flag.Parse()
	command := strings.Join(flag.Args(), " ")
	if *image == "" || command == "" {
		fmt.Fprintln(os.Stderr, "usage: ci-runner -name NAME -image IMAGE [flags] -- COMMAND...")
		return 2
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c, err := client.Connect(ctx, client.OptionsFromEnv())
	if err != nil {
		return fail(err)
	}
	defer c.Close()

	// A key pair for this job only: the public half goes in the spec, the
	// private half never leaves this process.
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fail(err)
	}
	signer, _ := ssh.NewSignerFromKey(priv)
	sshPub, _ := ssh.NewPublicKey(pub)
	spec := api.VmSpec{Name: *name, Backend: api.BackendTag(*backend), MemoryMB: *memory,
		SSH: &api.SshConfig{User: *user, PublicKey: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))}}
	if st, err := os.Stat(*image); err == nil && st.Mode().IsRegular() {
		spec.ImagePath, _ = filepath.Abs(*image) // a file on the VM's host (this machine, here)
	} else {
		spec.Image = *image // a name in the host's image store (vmctl image pull)
	}

	// Send the prepare without waiting, to read the events from just
	// before it (s.From): none of this job's is missed, and none of an
	// earlier VM of the same name is shown.
	s, err := c.Send(ctx, *name, api.ActPrepare, api.Command{Spec: &spec})
	if err != nil {
		return fail(err)
	}
	watching, stopWatching := context.WithCancel(context.Background()) // outlives ctx, to show the destroy
	defer stopWatching()
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for st, err := range c.Watch(watching, client.WatchOptions{VM: *name, From: s.From}) {
			if err != nil {
				fmt.Fprintln(os.Stderr, "ci-runner: watching events:", err)
				return
			}
			printEvent(st)
			if st.Event.Action == api.ActDestroy && st.Event.Type != api.TypeAccepted {
				return // the destroy's outcome ends the VM's story
			}
		}
	}()

	_, err = c.Wait(ctx, s)
	var rej *client.RejectedError
	if errors.As(err, &rej) {
		return fail(err) // nothing was made: the name may be another job's VM
	}
	// The VM exists: destroy it however the job ends, with a context of
	// its own (ctx may be what ended), and let the watcher print it.
	defer func() {
		dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer dcancel()
		if _, err := c.Destroy(dctx, *name); err != nil {
			fmt.Fprintln(os.Stderr, "ci-runner: destroying:", explain(err))
		}
		select {
		case <-watched:
		case <-time.After(5 * time.Second):
		}
	}()
	if err != nil {
		return fail(err)
	}
	if _, err := c.Start(ctx, *name); err != nil {
		return fail(err)
	}

	sc, err := dialSSH(ctx, c, *name, &ssh.ClientConfig{
		User: *user,
		Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		// Accepting any host key is for a demo only. In production, pin
		// the key the guest prints on its console at boot (client.Log;
		// cloud-init's "BEGIN SSH HOST KEY KEYS" block) and compare it
		// here.
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			fmt.Printf("guest host key %s\n", ssh.FingerprintSHA256(key))
			return nil
		},
		// ed25519 first, as OpenSSH prefers it: some dropbear builds
		// advertise RSA signatures with no RSA key, and fail if chosen.
		HostKeyAlgorithms: []string{ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256},
		Timeout:           10 * time.Second,
	})
	if err != nil {
		return fail(err)
	}
	defer sc.Close()
	sess, err := sc.NewSession()
	if err != nil {
		return fail(err)
	}
	defer sess.Close()
	sess.Stdout, sess.Stderr = os.Stdout, os.Stderr
	fmt.Printf("running %q as %s on %s\n", command, *user, *name)
	err = sess.Run(command)
	var exit *ssh.ExitError
	switch {
	case err == nil:
		fmt.Println("exit status 0")
		return 0
	case errors.As(err, &exit):
		fmt.Printf("exit status %d\n", exit.ExitStatus())
		return exit.ExitStatus()
	}
	return fail(err)
}

// dialSSH retries until the guest's SSH server completes a handshake
// through the tunnel: while the guest boots, the tunnel opens but the
// connection is closed or nothing answers.
func dialSSH(ctx context.Context, c *client.Client, name string, cfg *ssh.ClientConfig) (*ssh.Client, error) {
	t0 := time.Now()
	for {
		conn, err := c.DialGuest(ctx, name, 22)
		if err == nil {
			_ = conn.SetDeadline(time.Now().Add(cfg.Timeout))
			sc, chans, reqs, herr := ssh.NewClientConn(conn, conn.RemoteAddr().String(), cfg)
			if herr == nil {
				_ = conn.SetDeadline(time.Time{})
				fmt.Printf("ssh answered after %s\n", time.Since(t0).Round(100*time.Millisecond))
				return ssh.NewClient(sc, chans, reqs), nil
			}
			conn.Close()
			err = herr
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for ssh on %s: %w (last try: %v)", name, ctx.Err(), err)
		case <-time.After(time.Second):
		}
	}
}

func printEvent(st client.Stored) {
	ev := st.Event
	line := fmt.Sprintf("event %d %s %s", st.Seq, ev.Type, ev.Action)
	if ev.Host != "" {
		line += " host=" + ev.Host
	}
	if why := ev.Reason + ev.Error; why != "" { // a rejection's reason, a failure's error
		line += ": " + why
	}
	fmt.Println(line)
}

// fail prints err, saying what kind of no it is, and returns exit code 1.
func fail(err error) int {
	fmt.Fprintln(os.Stderr, "ci-runner:", explain(err))
	return 1
}

// explain branches on vmherd's typed errors the way a CI system would.
func explain(err error) string {
	var (
		conn *client.ConnectError
		rej  *client.RejectedError
		fl   *client.FailedError
	)
	switch {
	case errors.As(err, &conn):
		return fmt.Sprintf("cannot reach vmherd at %s (set NATS_URL and NATS_CREDS): %v", conn.URL, conn.Err)
	case errors.Is(err, client.ErrNoEngine):
		return fmt.Sprintf("no engine is running: %v", err)
	case errors.As(err, &rej):
		return fmt.Sprintf("%s of %s rejected by the engine: %s", rej.Action, rej.VM, rej.Reason)
	case errors.As(err, &fl):
		return fmt.Sprintf("%s of %s failed on host %s: %s", fl.Action, fl.VM, fl.Host, fl.Message)
	case errors.Is(err, client.ErrNotAllowed):
		return fmt.Sprintf("these credentials may not do that: %v", err)
	}
	return err.Error()
}
