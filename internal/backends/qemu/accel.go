package qemu

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
)

// detectAccel picks KVM only when it can run a normal guest: /dev/kvm is
// there, the CPU advertises vmx or svm, and kvm_intel or kvm_amd is loaded.
// (A /dev/kvm from another provider, like kvm_pvm, cannot.) Otherwise TCG.
// It returns the choice and why.
func detectAccel(procRoot, sysRoot, devKVM string) (string, string) {
	if _, err := os.Stat(devKVM); err != nil {
		return AccelTCG, devKVM + " is missing"
	}
	vmx, svm := cpuFlags(filepath.Join(procRoot, "cpuinfo"))
	if !vmx && !svm {
		return AccelTCG, "the CPU advertises neither vmx nor svm"
	}
	mod := "kvm_intel"
	if !vmx {
		mod = "kvm_amd"
	}
	if _, err := os.Stat(filepath.Join(sysRoot, "module", mod)); err != nil {
		return AccelTCG, mod + " is not loaded"
	}
	return AccelKVM, mod + " is loaded"
}

func cpuFlags(path string) (vmx, svm bool) {
	f, err := os.Open(path)
	if err != nil {
		return false, false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, fl := range strings.Fields(v) {
			switch fl {
			case "vmx":
				vmx = true
			case "svm":
				svm = true
			}
		}
		return vmx, svm
	}
	return false, false
}
