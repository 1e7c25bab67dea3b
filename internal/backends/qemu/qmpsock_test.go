package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// scriptedQMP serves one QMP connection on a unix socket: the greeting, then
// for each command line the reply answer returns, written in one write
// with the events before and after it.
func scriptedQMP(t *testing.T, greeting string, answer func(cmd string) (before, reply, after string)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := c.Write([]byte(greeting + "\n")); err != nil {
			return
		}
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			before, reply, after := answer(strings.TrimSpace(line))
			if _, err := c.Write([]byte(before + reply + "\n" + after)); err != nil {
				return
			}
		}
	}()
	return path
}

const testGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`

func events(n int, name string) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, `{"timestamp": {"seconds": %d, "microseconds": 1}, "event": %q, "data": {"pad": %q}}`+"\n", i, name, strings.Repeat("x", 100))
	}
	return b.String()
}

// TestSocketMonitorReplies: replies come back whole and stay the
// caller's, with events before and right after them in the same write
// (go-qemu's SocketMonitor hands out its scanner's buffer, which the next
// line overwrites); errors carry QEMU's description; a reply over 64 KiB
// is read; a line over maxQMPLine ends the call with a clear error.
func TestSocketMonitorReplies(t *testing.T) {
	big := strings.Repeat("b", 200<<10)
	path := scriptedQMP(t, testGreeting, func(cmd string) (string, string, string) {
		var c struct {
			Execute string `json:"execute"`
		}
		if err := json.Unmarshal([]byte(cmd), &c); err != nil {
			return "", `{"error": {"class": "GenericError", "desc": "not JSON"}}`, ""
		}
		switch c.Execute {
		case "qmp_capabilities":
			return "", `{"return": {}}`, ""
		case "query-status":
			return events(50, "RTC_CHANGE"), `{"return": {"status": "running", "singlestep": false, "running": true}}`, events(200, "STOP")
		case "query-big":
			return "", `{"return": {"blob": "` + big + `"}}`, ""
		case "query-huge":
			return "", `{"return": "` + strings.Repeat("h", maxQMPLine) + `"}`, ""
		default:
			return events(3, "RESUME"), `{"error": {"class": "CommandNotFound", "desc": "The command ` + c.Execute + ` has not been found"}}`, ""
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()

	var first []byte
	for i := range 20 {
		b, err := m.mon.Run([]byte(`{"execute":"query-status"}`))
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = b
		}
		var st qmpStatus
		if err := m.run(ctx, "query-status", nil, &st); err != nil || st.Status != "running" || !st.Running {
			t.Fatalf("query-status: %+v, %v", st, err)
		}
	}
	if want := `{"return": {"status": "running", "singlestep": false, "running": true}}`; string(first) != want {
		t.Fatalf("the first reply changed after later reads:\n%s\nwant\n%s", first, want)
	}
	err = m.run(ctx, "no-such-command", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "The command no-such-command has not been found") {
		t.Fatalf("unknown command: %v", err)
	}
	var blob struct {
		Blob string `json:"blob"`
	}
	if err := m.run(ctx, "query-big", nil, &blob); err != nil || blob.Blob != big {
		t.Fatalf("a 200 KiB reply: %d bytes, %v", len(blob.Blob), err)
	}
	if err := m.run(ctx, "query-huge", nil, nil); err == nil || !strings.Contains(err.Error(), "over") {
		t.Fatalf("a reply over %d bytes: %v", maxQMPLine, err)
	}
}

// TestSocketMonitorHandshake: a socket that does not greet as QMP is
// refused with what it said, and a failed qmp_capabilities is an error.
func TestSocketMonitorHandshake(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	path := scriptedQMP(t, `SSH-2.0-OpenSSH_9.2`, func(string) (string, string, string) { return "", `{"return": {}}`, "" })
	if _, err := dialQMP(ctx, path); err == nil || !strings.Contains(err.Error(), "not a QMP greeting") {
		t.Fatalf("an SSH server: %v", err)
	}
	path = scriptedQMP(t, testGreeting, func(string) (string, string, string) {
		return "", `{"error": {"class": "GenericError", "desc": "capabilities refused"}}`, ""
	})
	if _, err := dialQMP(ctx, path); err == nil || !strings.Contains(err.Error(), "capabilities refused") {
		t.Fatalf("refused capabilities: %v", err)
	}
	// A QMP that goes silent: the context bounds the handshake.
	silent := make(chan struct{})
	t.Cleanup(func() { close(silent) })
	path = scriptedQMP(t, testGreeting, func(string) (string, string, string) {
		<-silent
		return "", "", ""
	})
	short, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel2()
	if _, err := dialQMP(short, path); err == nil || !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("a silent QMP: %v", err)
	}
	// A QEMU that accepts but never greets: the handshake gives up at its
	// context's end and closes the connection (no goroutine or socket is
	// left waiting on it).
	path = filepath.Join(t.TempDir(), "mute.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	closed := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			closed <- err
			return
		}
		defer c.Close()
		_, err = c.Read(make([]byte, 1))
		closed <- err
	}()
	short, cancel3 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel3()
	if _, err := dialQMP(short, path); err == nil {
		t.Fatal("a QEMU that never greets: the handshake succeeded")
	}
	select {
	case err := <-closed:
		if err == nil {
			t.Fatal("the monitor wrote to a QEMU that never greeted")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the connection to a QEMU that never greets was left open after the handshake gave up")
	}
}

// TestSocketMonitorOutOfStep: after a line that is not JSON the monitor
// closes the connection, so no later command reads a reply meant for an
// earlier one.
func TestSocketMonitorOutOfStep(t *testing.T) {
	n := 0
	path := scriptedQMP(t, testGreeting, func(cmd string) (string, string, string) {
		if strings.Contains(cmd, "capabilities") {
			return "", `{"return": {}}`, ""
		}
		n++
		if n == 1 {
			return "", `garbage`, `{"return": {"status": "running", "running": true}}` + "\n"
		}
		return "", `{"return": {"status": "paused", "running": false}}`, ""
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	if err := m.run(ctx, "query-status", nil, nil); err == nil || !strings.Contains(err.Error(), "not JSON") {
		t.Fatalf("a reply that is not JSON: %v", err)
	}
	var st qmpStatus
	if err := m.run(ctx, "query-status", nil, &st); err == nil {
		t.Fatalf("a command after the monitor lost step read %+v", st)
	}
}
