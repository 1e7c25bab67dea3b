package api

import "time"

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

// StatsReply answers the stats query: one sample of a running or
// suspended VM's counters, read live from its hypervisor (schemas/
// stats.json). Counters count from the start of the hypervisor process;
// a rate is the difference of two samples over the difference of their
// times. Nets is absent when the backend cannot read the NICs' counters
// (NetsUnavailable says why: user-mode networking) or the VM has none.
type StatsReply struct {
	VM        string      `json:"vm"`
	Host      string      `json:"host"`
	Backend   BackendTag  `json:"backend"`
	State     VmState     `json:"state"`
	Time      time.Time   `json:"time"`
	StartedAt time.Time   `json:"started_at,omitzero"`
	UptimeMS  int64       `json:"uptime_ms"`
	CPUNS     int64       `json:"cpu_ns"`
	Vcpus     []VcpuStats `json:"vcpus"`
	// MemoryBytes is the guest's memory; RSSBytes the hypervisor
	// process's resident memory (0: unknown).
	MemoryBytes     int64       `json:"memory_bytes"`
	RSSBytes        int64       `json:"rss_bytes"`
	Disks           []DiskStats `json:"disks"`
	Nets            []NetStats  `json:"nets,omitempty"`
	NetsUnavailable string      `json:"nets_unavailable,omitempty"`
	// Simulated: the counters are made up (the Noop backend).
	Simulated bool `json:"simulated,omitempty"`
}

// VcpuStats is one vCPU of a StatsReply: the host thread that runs it
// (absent when it has none of its own) and that thread's CPU time.
type VcpuStats struct {
	Index    int   `json:"index"`
	ThreadID int   `json:"thread_id,omitempty"`
	CPUNS    int64 `json:"cpu_ns"`
}

// DiskStats are one block device's counters.
type DiskStats struct {
	Device  string `json:"device"`
	RdBytes int64  `json:"rd_bytes"`
	WrBytes int64  `json:"wr_bytes"`
	RdOps   int64  `json:"rd_ops"`
	WrOps   int64  `json:"wr_ops"`
}

// NetStats are one NIC's counters as the guest sees them: rx is what
// the guest received.
type NetStats struct {
	Name      string `json:"name"`
	RxBytes   int64  `json:"rx_bytes"`
	TxBytes   int64  `json:"tx_bytes"`
	RxPackets int64  `json:"rx_packets"`
	TxPackets int64  `json:"tx_packets"`
}
