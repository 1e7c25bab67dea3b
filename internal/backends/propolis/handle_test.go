package propolis

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"

	"github.com/vmherd/vmherd/api"
)

// A handle stored before Data reads back with its server, instance and
// placement; written again with withPlacement it is in the new form.
func TestLegacyHandleData(t *testing.T) {
	b, err := os.ReadFile("../../../api/testdata/handle-propolis-legacy.json")
	if err != nil {
		t.Fatal(err)
	}
	var h api.VmHandle
	if err := json.Unmarshal(b, &h); err != nil {
		t.Fatal(err)
	}
	d, err := DataOf(h)
	if err != nil {
		t.Fatal(err)
	}
	want := HandleData{Endpoint: "127.0.0.1:12400", InstanceID: "7c9e6679-7425-40de-944b-e07fc1f90ae7", MAC: "02:08:20:01:02:03",
		Extra: map[string]string{extraDisk: "/dev/zvol/rdsk/rpool/vmherd/p1", extraVNIC: "vmherd_p1", extraPrefix + "zvol": "rpool/vmherd/p1"}}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("data %+v\nwant %+v", d, want)
	}
	p := placementOf(h)
	wantP := Placement{Endpoint: want.Endpoint, PID: 77, MAC: want.MAC, DiskPath: "/dev/zvol/rdsk/rpool/vmherd/p1", VNIC: "vmherd_p1", Extra: map[string]string{"zvol": "rpool/vmherd/p1"}}
	if !reflect.DeepEqual(p, wantP) {
		t.Fatalf("placement %+v\nwant %+v", p, wantP)
	}
	var be Backend
	if got := be.Details(h); !reflect.DeepEqual(got, map[string]string{"endpoint": want.Endpoint, "instance_id": want.InstanceID}) {
		t.Fatalf("Details = %v", got)
	}
	// The placement written back keeps the instance and everything else.
	p.PID = 78
	h2 := withPlacement(h, p)
	if d2 := dataOf(h2); h2.PID != 78 || !reflect.DeepEqual(d2, want) {
		t.Fatalf("withPlacement: pid %d data %+v", h2.PID, d2)
	}
	out, _ := json.Marshal(h2)
	var top map[string]json.RawMessage
	_ = json.Unmarshal(out, &top)
	if _, ok := top["endpoint"]; ok || top["data"] == nil {
		t.Fatalf("not in the new form: %s", out)
	}
}
