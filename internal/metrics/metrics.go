// Package metrics is what engines and workers tell Prometheus: commands
// by action and outcome, decision and task latencies, VMs by state, host
// heartbeat ages, backend calls and redeliveries. One Set per process
// (the engine with --with-worker shares it with its worker), served on
// --metrics-listen at /metrics. Every method is safe on a nil *Set, which
// records nothing.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Set holds the process's metrics and their registry.
type Set struct {
	Registry *prometheus.Registry

	commands      *prometheus.CounterVec
	decision      *prometheus.HistogramVec
	task          *prometheus.HistogramVec
	backendCall   *prometheus.HistogramVec
	backendFailed *prometheus.CounterVec
	redeliveries  *prometheus.CounterVec
	vms           *prometheus.GaugeVec
}

// latency buckets: from half a millisecond (a Noop call) to ten minutes (a
// slow prepare).
var buckets = prometheus.ExponentialBucketsRange(0.0005, 600, 20)

// New makes a Set with the Go and process collectors.
func New() *Set {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &Set{
		Registry: r,
		commands: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmherd_commands_total",
			Help: "Commands decided by this engine, by action and outcome (accepted, rejected).",
		}, []string{"action", "outcome"}),
		decision: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmherd_decision_seconds",
			Help:    "From a command stored in VM_COMMANDS to its decision stored in VM_EVENTS, by action and outcome.",
			Buckets: buckets,
		}, []string{"action", "outcome"}),
		task: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmherd_task_seconds",
			Help:    "From a task stored in VM_TASKS to its result stored in VM_EVENTS, by action and result.",
			Buckets: buckets,
		}, []string{"action", "result"}),
		backendCall: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmherd_backend_call_seconds",
			Help:    "Duration of hypervisor backend calls, by backend and action.",
			Buckets: buckets,
		}, []string{"backend", "action"}),
		backendFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmherd_backend_call_failures_total",
			Help: "Backend calls that failed, by backend and action.",
		}, []string{"backend", "action"}),
		redeliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmherd_redeliveries_total",
			Help: "Messages delivered again by JetStream (a crash, a timeout or a nak before), by consumer: engine, worker.",
		}, []string{"consumer"}),
		vms: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vmherd_vms",
			Help: "VMs by state, as this engine's projection has folded them (destroyed VMs included).",
		}, []string{"state"}),
	}
	r.MustRegister(s.commands, s.decision, s.task, s.backendCall, s.backendFailed, s.redeliveries, s.vms)
	return s
}

// Decided counts a decision and its latency since the command was stored.
func (s *Set) Decided(action, outcome string, stored time.Time) {
	if s == nil {
		return
	}
	s.commands.WithLabelValues(action, outcome).Inc()
	if !stored.IsZero() {
		s.decision.WithLabelValues(action, outcome).Observe(time.Since(stored).Seconds())
	}
}

// TaskDone records a task's latency from its storing to its result.
func (s *Set) TaskDone(action, result string, stored time.Time) {
	if s == nil || stored.IsZero() {
		return
	}
	s.task.WithLabelValues(action, result).Observe(time.Since(stored).Seconds())
}

// BackendCall records one backend call.
func (s *Set) BackendCall(backend, action string, took time.Duration, err error) {
	if s == nil {
		return
	}
	s.backendCall.WithLabelValues(backend, action).Observe(took.Seconds())
	if err != nil {
		s.backendFailed.WithLabelValues(backend, action).Inc()
	}
}

// Redelivered counts a message JetStream delivered more than once.
func (s *Set) Redelivered(consumer string, numDelivered uint64) {
	if s == nil || numDelivered <= 1 {
		return
	}
	s.redeliveries.WithLabelValues(consumer).Inc()
}

// VMState moves one VM from state old to state now ("" for none).
func (s *Set) VMState(old, now string) {
	if s == nil || old == now {
		return
	}
	if old != "" {
		s.vms.WithLabelValues(old).Dec()
	}
	if now != "" {
		s.vms.WithLabelValues(now).Inc()
	}
}

// Register adds a collector (the engine's host registry).
func (s *Set) Register(c prometheus.Collector) {
	if s != nil {
		s.Registry.MustRegister(c)
	}
}

// Serve serves /metrics on addr until ctx ends. It returns once the
// listener is open (or failed to open); the address it listens on (useful
// with port 0) is logged and returned.
func (s *Set) Serve(ctx context.Context, addr string, log *slog.Logger) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("metrics: listening on %s: %w (choose another with --metrics-listen)", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{Registry: s.Registry}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	log.Info("metrics serving", "url", "http://"+ln.Addr().String()+"/metrics")
	return ln.Addr().String(), nil
}
