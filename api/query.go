package api

// The bodies of the worker's query service (vm.query.<host>.<endpoint>):
// shared by the worker that answers and the clients that ask.

// QueryRequest is the body of a query: which VM.
type QueryRequest struct {
	VM string `json:"vm"`
}

// StateReply answers the state query.
type StateReply struct {
	VM     string   `json:"vm"`
	Host   string   `json:"host"`
	State  VmState  `json:"state"`
	Handle VmHandle `json:"handle"`
	// Details is what the backend shows of the handle's data, by name:
	// "accel", "vnc", "ssh" (QEMU), "endpoint", "instance_id" (Propolis).
	Details map[string]string `json:"details,omitempty"`
}

// GuestIPReply answers the guest_ip query. Port is set for user networking,
// where the guest's SSH port is forwarded to IP:Port on the host.
type GuestIPReply struct {
	VM   string `json:"vm"`
	IP   string `json:"ip"`
	Port int    `json:"port,omitempty"`
}
