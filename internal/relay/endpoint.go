package relay

import (
	"context"
	"fmt"
	"io"
	"net"

	"github.com/vmherd/vmherd/api"
)

// DialUnix opens a console endpoint that is a unix socket (QEMU's serial);
// the backend of any other kind supplies its own dialer (Server.Dial).
func DialUnix(ctx context.Context, ep api.ConsoleEndpoint) (io.ReadWriteCloser, error) {
	if ep.Kind != api.ConsoleUnixSocket {
		return nil, fmt.Errorf("this VM has no console this host can open (backend console kind %q)", ep.Kind)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", ep.Path)
	if err != nil {
		return nil, fmt.Errorf("connecting to the console socket %s: %w", ep.Path, err)
	}
	return c, nil
}
