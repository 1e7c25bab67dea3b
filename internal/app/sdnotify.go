package app

import (
	"log/slog"
	"net"
	"os"
)

// sdNotify tells systemd the daemon's state (sd_notify(3)) when it runs
// it as a Type=notify unit: READY=1 once it serves, so that `systemctl
// start` returns when the engine decides commands, or the worker takes
// its tasks, rather than when the process starts.
func sdNotify(log *slog.Logger, state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	if path[0] == '@' {
		path = "\x00" + path[1:] // an abstract socket
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err == nil {
		_, err = c.Write([]byte(state))
		c.Close()
	}
	if err != nil {
		log.Warn("telling systemd the state failed", "state", state, "err", err)
	}
}
