// Package provision runs a VMFile's provisioning steps on a guest over
// SSH (golang.org/x/crypto/ssh, github.com/pkg/sftp), through whatever
// connection it is given (vmctl gives it a tunnel over NATS), and holds
// the SSH key and host key handling they need.
package provision

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
)

// NewKey makes an ed25519 key pair: the private key in OpenSSH PEM form
// and the public key as an authorized_keys line.
func NewKey(comment string) (private []byte, public string, err error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, "", err
	}
	block, err := ssh.MarshalPrivateKey(priv, comment)
	if err != nil {
		return nil, "", err
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, "", err
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp)))
	if comment != "" {
		line += " " + comment
	}
	return pem.EncodeToMemory(block), line, nil
}

// HostKeys reads the host public keys a guest printed on its console the
// way cloud-init does (between "-----BEGIN SSH HOST KEY KEYS-----" and
// "-----END SSH HOST KEY KEYS-----"); the last such block wins (the
// latest boot).
func HostKeys(console []byte) ([]ssh.PublicKey, error) {
	var keys []ssh.PublicKey
	var cur []ssh.PublicKey
	in := false
	sc := bufio.NewScanner(bytes.NewReader(console))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(strings.TrimRight(sc.Text(), "\r"))
		switch {
		case strings.HasSuffix(line, HostKeysBegin):
			in, cur = true, nil
		case strings.HasSuffix(line, HostKeysEnd):
			if in && len(cur) > 0 {
				keys = cur
			}
			in = false
		case in:
			if k, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line)); err == nil {
				cur = append(cur, k)
			}
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("the console shows no SSH host keys yet (cloud-init prints them between " + HostKeysBegin + " and " + HostKeysEnd + ")")
	}
	return keys, nil
}

// KnownKeys is a HostKeyCallback that accepts only the given keys.
func KnownKeys(keys []ssh.PublicKey) ssh.HostKeyCallback {
	return func(_ string, _ net.Addr, key ssh.PublicKey) error {
		for _, k := range keys {
			if bytes.Equal(k.Marshal(), key.Marshal()) {
				return nil
			}
		}
		return fmt.Errorf("host key mismatch: the guest presented %s %s, not the key it published on its console (%d known); refusing to connect", key.Type(), ssh.FingerprintSHA256(key), len(keys))
	}
}

// ClientConfig logs in as user with signer, accepting only hostKeys, and
// offers only their algorithms (an SSH server that advertises a host key
// algorithm it has no key for, as dropbear 2022 can, then cannot pick it).
func ClientConfig(user string, signer ssh.Signer, hostKeys []ssh.PublicKey) *ssh.ClientConfig {
	var algos []string
	for _, k := range hostKeys {
		switch t := k.Type(); t {
		case ssh.KeyAlgoRSA:
			algos = append(algos, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256)
		default:
			algos = append(algos, t)
		}
	}
	return &ssh.ClientConfig{
		User: user, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: KnownKeys(hostKeys), HostKeyAlgorithms: algos, Timeout: 30 * time.Second,
	}
}

// HostKeysBegin and HostKeysEnd enclose a guest's SSH host public keys on
// its console, one per line, as cloud-init prints them (and the repo's
// test guest: internal/guestimage/files/init).
const (
	HostKeysBegin = "-----BEGIN SSH HOST KEY KEYS-----"
	HostKeysEnd   = "-----END SSH HOST KEY KEYS-----"
)
