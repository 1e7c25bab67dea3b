//go:build !illumos

package propolis

// NewHostProvisioner is only available on illumos.
func NewHostProvisioner(HostOptions) (Provisioner, error) {
	return nil, ErrNeedsIllumos
}
