package provision

import (
	"fmt"
	"os"
	"strings"
)

// ReadPublicKey reads a file holding one SSH public key; the error names
// the path and says what to give instead.
func ReadPublicKey(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("%s: %v (give the path of a public key file, e.g. ~/.ssh/id_ed25519.pub)", path, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file (give the path of a public key file, e.g. ~/.ssh/id_ed25519.pub)", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %v", path, err)
	}
	key := strings.TrimSpace(string(b))
	switch {
	case strings.Contains(key, "PRIVATE KEY"):
		return "", fmt.Errorf("%s is a private key; give its public half (%s.pub)", path, path)
	case key == "" || strings.ContainsAny(key, "\n\r"):
		return "", fmt.Errorf("%s must hold exactly one public key line", path)
	}
	return key, nil
}
