// Package client drives vmherd from a Go program: the library vmctl is
// built on.
//
// # Connecting
//
// Connect takes the server (or a cluster's servers) and an identity's
// credentials file; OptionsFromEnv reads them as vmctl and the nats CLI do
// (NATS_URL, NATS_CREDS, NATS_CA, else the local engine's admin
// credentials when this user may read them). The credentials name the
// identity: its name is the issuer token every command carries, and its
// inbox prefix is the only one its permissions let replies come to.
//
//	c, err := client.Connect(ctx, client.OptionsFromEnv())
//	if err != nil { ... }
//	defer c.Close()
//
// # Commands
//
// Create, Start, Stop, Suspend, Resume, Destroy and Migrate send a
// lifecycle command and return once its result is stored and the VM's
// record shows it (Result.Record), so what the program does next sees it.
// Do is the general form. A command is identified by its command id (one is
// made when the command has none): sending it again, after a timeout or a
// reconnect, is deduplicated by the server, so it is done once. Send stores
// a command without waiting; Wait and WaitCommand follow one later.
//
// Errors are typed, for errors.Is and errors.As: *RejectedError (the
// state machine's reason; a VM that does not exist is also ErrNotFound),
// *FailedError (the backend could not), *TimeoutError (ctx ended first:
// the command is stored and still happens), *NoEngineError (no engine
// decides commands: nothing was sent), *WorkerError (a worker's refusal,
// or ErrNoWorker), ErrNotAllowed (the identity may not).
//
// # Reading
//
// Record, Records, History, Hosts and Images read what the engines and
// workers keep; State, GuestIP and Query ask the worker of the VM's host.
// Watch is an iterator over events (one VM's, one host's or all), from now,
// from a sequence or from the start, that keeps its place across reconnects
// and server restarts; WaitState, WaitSSH and WaitCommand wait for a
// condition. None of these leaves a consumer on the server.
//
// # Guests
//
// Console attaches to a VM's serial console, DialGuest opens a TCP
// connection to a guest port, and Log reads the console log: each through
// the worker of the VM's host, from any machine on the bus, whatever the
// guest's network.
//
// The wire types are package github.com/vmherd/vmherd/api's;
// docs/contract.md describes the same contract for other languages.
package client
