package bench

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	natsd "github.com/nats-io/nats-server/v2/server"
)

// Environment is where the numbers were taken.
type Environment struct {
	CPU           string `json:"cpu"`
	Cores         int    `json:"cores"`
	GOMAXPROCS    int    `json:"gomaxprocs"`
	MemoryMiB     int64  `json:"memory_mib"`
	Kernel        string `json:"kernel"`
	OS            string `json:"os"`
	GoVersion     string `json:"go_version"`
	NATSServer    string `json:"nats_server"`
	Storage       string `json:"storage"`
	Hostname      string `json:"hostname"`
	LoadAvgAtEnd  string `json:"loadavg_at_end,omitempty"`
	LoadAvgAtBeg  string `json:"loadavg_at_start"`
	QEMU          string `json:"qemu,omitempty"`
	SyncSettings  string `json:"sync_settings"`
	BenchCommand  string `json:"command"`
	WorkDirFSType string `json:"work_dir_fs"`
}

func environment(workDir string, args []string) Environment {
	e := Environment{
		Cores: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), GoVersion: runtime.Version(),
		OS:         runtime.GOOS + "/" + runtime.GOARCH,
		NATSServer: "nats-server v" + natsd.VERSION + " embedded (library), JetStream file storage",
		Kernel:     strings.TrimSpace(readFile("/proc/sys/kernel/osrelease")),
		CPU:        cpuModel(),
		MemoryMiB:  memTotalMiB(),
		SyncSettings: `"always" (vmherd's default: fsync every write) and "default" (nats-server's own: ` +
			`sync_interval 2m, data in the page cache in between)`,
		BenchCommand: "bench " + strings.Join(args, " "),
		LoadAvgAtBeg: loadAvg(),
	}
	e.Hostname, _ = os.Hostname()
	e.WorkDirFSType, e.Storage = fsOf(workDir)
	return e
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

func loadAvg() string {
	f := strings.Fields(readFile("/proc/loadavg"))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

// memTotalMiB reads /proc/meminfo (0 where there is none, e.g. illumos).
func memTotalMiB() int64 {
	var kb int64
	if _, err := fmt.Sscanf(readFile("/proc/meminfo"), "MemTotal: %d kB", &kb); err != nil {
		return 0
	}
	return kb >> 10
}

// fsOf returns the file system type and device of the mount holding dir.
func fsOf(dir string) (string, string) {
	best, typ, dev := "", "", ""
	for _, line := range strings.Split(readFile("/proc/mounts"), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		if (dir == f[1] || strings.HasPrefix(dir, strings.TrimSuffix(f[1], "/")+"/")) && len(f[1]) >= len(best) {
			best, dev, typ = f[1], f[0], f[2]
		}
	}
	if typ == "" {
		return "unknown", "unknown"
	}
	return typ, dev + " mounted on " + best
}

func qemuVersion() string {
	out, err := exec.Command("qemu-system-x86_64", "--version").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}
