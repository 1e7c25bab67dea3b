package vmctl

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"

	"golang.org/x/term"
)

// errorJSON is an error as --json prints it.
type errorJSON struct {
	Kind      string     `json:"kind"`
	ExitCode  int        `json:"exit_code"`
	Message   string     `json:"message"`
	VM        string     `json:"vm,omitempty"`
	Action    api.Action `json:"action,omitempty"`
	CommandID string     `json:"command_id,omitempty"`
	Reason    string     `json:"reason,omitempty"`
	Host      string     `json:"host,omitempty"`
}

func errorDoc(ee *exitError) *errorJSON {
	d := &errorJSON{Kind: ee.kind, ExitCode: ee.code, Message: ee.msg}
	var (
		rej    *client.RejectedError
		failed *client.FailedError
		te     *client.TimeoutError
		ne     *client.NoEngineError
		we     *client.WorkerError
	)
	switch {
	case errors.As(ee.err, &rej):
		d.VM, d.Action, d.CommandID, d.Reason = rej.VM, rej.Action, rej.CommandID, rej.Reason
	case errors.As(ee.err, &failed):
		d.VM, d.Action, d.CommandID, d.Reason, d.Host = failed.VM, failed.Action, failed.CommandID, failed.Message, failed.Host
	case errors.As(ee.err, &te):
		d.VM, d.Action, d.CommandID, d.Host = te.VM, te.Action, te.CommandID, te.Host
	case errors.As(ee.err, &ne):
		d.VM, d.Action, d.CommandID = ne.VM, ne.Action, ne.CommandID
	case errors.As(ee.err, &we):
		d.Host = we.Host
	}
	return d
}

// badFlagValue matches pflag's message for a value its type cannot parse.
var badFlagValue = regexp.MustCompile(`^invalid argument "(.*)" for "(.*)" flag: (?s:.*)$`)

// flagErrorWords says what a bad flag value should be, in the user's
// terms instead of Go's parser's ("strconv.ParseInt: parsing ...").
func flagErrorWords(err error) string {
	m := badFlagValue.FindStringSubmatch(err.Error())
	if m == nil {
		return err.Error()
	}
	flag := m[2]
	if i := strings.Index(flag, "--"); i >= 0 {
		flag = flag[i:]
	}
	want := "a valid value"
	switch {
	case strings.Contains(err.Error(), "ParseInt"), strings.Contains(err.Error(), "ParseUint"):
		want = "a whole number"
	case strings.Contains(err.Error(), "ParseFloat"):
		want = "a number"
	case strings.Contains(err.Error(), "ParseBool"):
		want = "true or false"
	case strings.Contains(err.Error(), "time: "):
		want = "a duration with its unit, such as 30s, 5m or 1h"
	}
	return fmt.Sprintf("%s %q: want %s", flag, m[1], want)
}

// progress shows, on a terminal, what vmctl is waiting for and since when.
type progress struct {
	w     io.Writer
	on    bool
	quiet bool // --progress never
	label string
	what  string
	since time.Time
	shown bool
	// said is the trouble last said (on its own line, terminal or not).
	said string
}

func (g *globals) newProgress(label string) *progress {
	on := false
	switch g.progress {
	case "always":
		on = true
	case "never":
	default:
		f, ok := g.errOut.(*os.File)
		on = ok && term.IsTerminal(int(f.Fd()))
	}
	return &progress{w: g.errOut, on: on && !g.json, quiet: g.progress == "never", label: label}
}

// trouble says, once per change and on its own line even when stderr is
// not a terminal, why the wait may be long (the bus or the engines went
// away), and when that is over.
func (p *progress) trouble(why string) {
	if why == p.said || p.quiet {
		return
	}
	p.clear()
	switch {
	case why != "":
		fmt.Fprintf(p.w, "vmctl: %s: still waiting for %s: %s\n", p.label, p.what, why)
	case p.said != "":
		fmt.Fprintf(p.w, "vmctl: %s: going on (waiting for %s)\n", p.label, p.what)
	}
	p.said = why
}

func (p *progress) waitingFor(what string) {
	p.what, p.since = what, time.Now()
}

func (p *progress) show() {
	if !p.on {
		return
	}
	fmt.Fprintf(p.w, "\r\033[K%s: waiting for %s since %s (%s)", p.label, p.what,
		p.since.Format("15:04:05"), time.Since(p.since).Round(time.Second))
	p.shown = true
}

func (p *progress) clear() {
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
		p.shown = false
	}
}

func (g *globals) printf(format string, args ...any) {
	if !g.json {
		fmt.Fprintf(g.out, format, args...)
	}
}

func (g *globals) printJSON(v any) error {
	g.printed = true
	enc := json.NewEncoder(g.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printEvent prints an event's text line (under --json the command's
// document holds it).
func (g *globals) printEvent(ev *api.Event) {
	if !g.json {
		fmt.Fprintln(g.out, formatEvent(0, ev))
	}
}

func formatHostEvent(seq uint64, ev *api.HostEvent) string {
	s := ""
	if seq > 0 {
		s = fmt.Sprintf("%-6d ", seq)
	}
	s += fmt.Sprintf("%s host=%s %s", ev.Time.Format("15:04:05.000"), ev.Host, ev.Type)
	if ev.Reason != "" {
		s += " reason=" + fmt.Sprintf("%q", ev.Reason)
	}
	if len(ev.VMs) > 0 {
		s += " vms=" + strings.Join(ev.VMs, ",")
	}
	return s
}

func formatEvent(seq uint64, ev *api.Event) string {
	s := ""
	if seq > 0 {
		s = fmt.Sprintf("%-6d ", seq)
	}
	s += fmt.Sprintf("%s %-10s %-9s %-8s %-10s %s", ev.Time.Format("15:04:05.000"), ev.VM, ev.Type, ev.Action, ev.State, ev.CommandID)
	if ev.Host != "" {
		s += " host=" + ev.Host
	}
	if ev.Reason != "" {
		s += " reason=" + fmt.Sprintf("%q", ev.Reason)
	}
	if ev.Error != "" {
		s += " error=" + fmt.Sprintf("%q", ev.Error)
	}
	if m := ev.Migration; m != nil {
		s += fmt.Sprintf(" from=%s to=%s mode=%s", m.From, m.To, m.Mode)
		if m.Phase != "" {
			s += " phase=" + m.Phase
		}
		if m.Total > 0 || m.Bytes > 0 {
			s += fmt.Sprintf(" bytes=%d/%d", m.Bytes, m.Total)
		}
		if ev.Type == api.TypeMigrated && m.Mode == api.MigrateLive {
			s += fmt.Sprintf(" downtime=%dms", m.DowntimeMS)
		}
		if m.CancelledBy != "" {
			s += " cancelled_by=" + m.CancelledBy
		}
	}
	if ev.Cancel {
		s += " cancel"
	}
	return s
}
