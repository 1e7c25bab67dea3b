package vmctl

import (
	"context"
	"errors"
	"io"

	"github.com/vmherd/vmherd/internal/vm"
)

// The Propolis serial console (a WebSocket) is wired in with the Propolis backend.
func dialWebSocketConsole(ctx context.Context, ep vm.ConsoleEndpoint) (io.ReadWriteCloser, error) {
	return nil, errors.New("websocket consoles are not supported yet")
}

func printWebSocketHistory(ctx context.Context, ep vm.ConsoleEndpoint, out io.Writer) error {
	return errors.New("websocket console history is not supported yet")
}
