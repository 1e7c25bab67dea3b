package client_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
)

// Purge through the client, with an operator's and the admin's
// credentials: a prepared VM is not purged (the reason); a destroyed one
// is, whoever created it, and its record is gone when Purge returns; the
// name is then new; the decision records who purged.
func TestPurge(t *testing.T) {
	op := connect(t, client.OptionsFromEnv()) // operator "ci"
	adm := connect(t, client.Options{URL: engineURL, Creds: adminCreds})
	ctx := ctxT(t, time.Minute)

	if _, err := adm.Create(ctx, api.VmSpec{Name: "purge1", Labels: map[string]string{"job": "7"}}); err != nil {
		t.Fatal(err)
	}
	if r, err := op.Record(ctx, "purge1"); err != nil || r.Labels["job"] != "7" {
		t.Fatalf("record: %+v, %v", r, err)
	}
	var rej *client.RejectedError
	if _, err := op.Purge(ctx, "purge1"); !errors.As(err, &rej) || errors.Is(err, client.ErrNotFound) ||
		!strings.Contains(rej.Reason, "cannot purge: vm is prepared; purge is allowed from destroyed") {
		t.Fatalf("purge of a prepared VM: %v", err)
	}
	if _, err := adm.Destroy(ctx, "purge1"); err != nil {
		t.Fatal(err)
	}
	res, err := op.Purge(ctx, "purge1")
	if err != nil || res.Final == nil || res.Final.Action != api.ActPurge || res.Final.Issuer != "ci" || res.Record != nil {
		t.Fatalf("purge of a destroyed VM: %+v, %v", res, err)
	}
	if _, err := adm.Record(ctx, "purge1"); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("record after the purge: %v", err)
	}
	if _, err := op.Purge(ctx, "purge1"); !errors.As(err, &rej) || !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("a second purge: %v, want a rejection for no such VM", err)
	}
	if _, err := op.Create(ctx, api.VmSpec{Name: "purge1"}); err != nil {
		t.Fatalf("create after the purge: %v", err)
	}
	if r, err := op.Record(ctx, "purge1"); err != nil || r.Generation != 1 || r.Labels != nil {
		t.Fatalf("the new VM of the name: %+v, %v", r, err)
	}
	if _, err := op.Destroy(ctx, "purge1"); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.Purge(ctx, "purge1"); err != nil {
		t.Fatalf("the admin's purge: %v", err)
	}
}
