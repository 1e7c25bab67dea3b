package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/vmherd/vmherd/api"
	"github.com/vmherd/vmherd/client"
)

// A VM's life: create it, start it, read its record, destroy it. Each
// call returns once the result is stored and the record shows it.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.Connect(ctx, client.OptionsFromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	if _, err := c.Create(ctx, api.VmSpec{Name: "example1", Vcpus: 1, MemoryMB: 256}); err != nil {
		log.Fatal(err)
	}
	res, err := c.Start(ctx, "example1")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(res.Final.Type, res.Record.State, "on host", res.Record.Host)

	if _, err := c.Destroy(ctx, "example1"); err != nil {
		log.Fatal(err)
	}
	r, _ := c.Record(ctx, "example1")
	fmt.Println(r.State)
	// Output:
	// started running on host local
	// destroyed
}

// A rejected command is a *RejectedError with the state machine's reason;
// a VM that never existed is also errors.Is ErrNotFound.
func ExampleRejectedError() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.Connect(ctx, client.OptionsFromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	_, err = c.Start(ctx, "never-made")
	var rej *client.RejectedError
	if errors.As(err, &rej) {
		fmt.Println("rejected; no such vm:", errors.Is(err, client.ErrNotFound))
	}

	if _, err := c.Create(ctx, api.VmSpec{Name: "example2"}); err != nil {
		log.Fatal(err)
	}
	_, err = c.Resume(ctx, "example2")
	if errors.As(err, &rej) {
		fmt.Println(rej.Reason)
	}
	_, _ = c.Destroy(ctx, "example2")
	// Output:
	// rejected; no such vm: true
	// cannot resume: vm is prepared; resume is allowed from suspended
}

// Watch follows events as they are stored; here one VM's, from its first.
func ExampleClient_Watch() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.Connect(ctx, client.OptionsFromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	if _, err := c.Create(ctx, api.VmSpec{Name: "example3"}); err != nil {
		log.Fatal(err)
	}
	if _, err := c.Destroy(ctx, "example3"); err != nil {
		log.Fatal(err)
	}
	for st, err := range c.Watch(ctx, client.WatchOptions{VM: "example3", History: true}) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(st.Event.Type, st.Event.Action)
		if st.Event.Type == api.TypeDestroyed {
			break
		}
	}
	// Output:
	// accepted prepare
	// prepared prepare
	// accepted destroy
	// destroyed destroy
}
