package events

import (
	"fmt"

	"github.com/vmherd/vmherd/api"
)

// DecodeStored parses an event stored on subj, with its writer from the
// subject. An event whose subject is not vm.evt.<vm>.<type>.<writer>, or
// whose body names another VM or type, is an error.
func DecodeStored(n api.Names, subj string, data []byte) (*api.Event, error) {
	name, t, writer, ok := n.ParseEventSubject(subj)
	if !ok {
		return nil, fmt.Errorf("decoding event: subject %q is not %s", subj, n.Event("<vm>", "<type>", "<writer>"))
	}
	ev, err := Decode(data)
	if err != nil {
		return nil, err
	}
	if ev.VM != name && name != api.InvalidVM || ev.Type != t {
		return nil, fmt.Errorf("decoding event: the body (vm %q, type %q) does not match the subject %q", ev.VM, ev.Type, subj)
	}
	ev.Writer = writer
	return ev, nil
}
