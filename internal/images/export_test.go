package images

import "net/netip"

// AllowOnly lets p reach exactly these addresses besides public ones.
func AllowOnly(p Policy, addrs ...netip.AddrPort) Policy {
	p.allowed = addrs
	return p
}
