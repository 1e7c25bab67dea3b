package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// HostEventType is the last token of vm.host.<host>.<type>.
type HostEventType string

// Host events: changes of a host's state, derived by the engines from the
// VM_HOSTS bucket (heartbeats and cordons).
const (
	HostLost       HostEventType = "host_lost"       // its heartbeat is older than --host-timeout
	HostBack       HostEventType = "host_back"       // a lost host heartbeats again
	HostCordoned   HostEventType = "host_cordoned"   // no new VM is placed on it
	HostUncordoned HostEventType = "host_uncordoned" // placements may go to it again
	HostForgotten  HostEventType = "host_forgotten"  // an operator removed it from VM_HOSTS
)

// HostEventTypes lists every host event type.
var HostEventTypes = []HostEventType{HostLost, HostBack, HostCordoned, HostUncordoned, HostForgotten}

// HostEvent is the body of a message on vm.host.<host>.<type>.
type HostEvent struct {
	Type HostEventType `json:"type"`
	Host string        `json:"host"`
	Time time.Time     `json:"time"`
	// Rev is the VM_HOSTS revision the change was seen at (the heartbeat
	// or cordon entry); with the type it makes the event's message id.
	Rev           uint64    `json:"rev"`
	Reason        string    `json:"reason,omitempty"`
	LastHeartbeat time.Time `json:"last_heartbeat,omitzero"`
	// VMs are, on host_lost, the VMs the records place on the host.
	VMs []string `json:"vms,omitempty"`
}

// HostEventMsgID names a host event by its host, type and revision, so the
// engines that all see one change store it once.
func HostEventMsgID(host string, t HostEventType, rev uint64) string {
	return fmt.Sprintf("host/%s/%s/%d", host, t, rev)
}

// DecodeHostEvent parses a host event body.
func DecodeHostEvent(data []byte) (*HostEvent, error) {
	var ev HostEvent
	if err := json.Unmarshal(data, &ev); err != nil {
		return nil, fmt.Errorf("decoding host event: %w", err)
	}
	if ev.Type == "" || ev.Host == "" {
		return nil, errors.New("decoding host event: missing type or host")
	}
	return &ev, nil
}

// Encode renders a host event body.
func (ev *HostEvent) Encode() []byte {
	b, err := json.Marshal(ev)
	if err != nil {
		panic(fmt.Sprintf("encoding host event: %v", err))
	}
	return b
}
