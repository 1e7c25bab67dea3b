package worker_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/testenv"
	"github.com/vmherd/vmherd/internal/worker"
)

// A worker's micro service is named after its host, so a discovery
// request for one host's service is a subject only that host's workers
// subscribe to (a worker's permissions can then allow it its own name
// only), and every endpoint it announces is on its host's subjects
// (issue #26.9).
func TestServiceNamedAfterItsHost(t *testing.T) {
	t.Parallel()
	env := testenv.New(t)
	eng := env.StartEngine(testenv.EngineConfig{})
	env.StartWorker(testenv.WorkerConfig{Host: "h1"})
	env.WaitHost(eng, "h1")
	subj, err := micro.ControlSubject(micro.InfoVerb, worker.ServiceName("h1"), "")
	if err != nil {
		t.Fatal(err)
	}
	if subj != "$SRV.INFO.vmherd-worker-h1" {
		t.Fatalf("discovery subject %s", subj)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	msg, err := env.NC.RequestWithContext(ctx, subj, nil)
	if err != nil {
		t.Fatalf("%s: %v", subj, err)
	}
	var info micro.Info
	if err := json.Unmarshal(msg.Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.Name != "vmherd-worker-h1" || info.Metadata["host"] != "h1" || len(info.Endpoints) == 0 {
		t.Fatalf("info: %+v", info)
	}
	for _, e := range info.Endpoints {
		if !strings.Contains(e.Subject, ".h1.") {
			t.Errorf("endpoint %s on %s, not on h1's subjects", e.Name, e.Subject)
		}
	}
}
