package images

import "time"

// State is where an image is on a host.
type State string

const (
	StatePulling State = "pulling"
	StateReady   State = "ready"
	StateFailed  State = "failed"
)

// Status is the value of <host>.<name> in VM_IMAGES: what a worker's store
// holds or is pulling (schema image.json).
type Status struct {
	Host         string    `json:"host"`
	Name         string    `json:"name"`
	State        State     `json:"state"`
	Source       string    `json:"source"`
	Digest       string    `json:"digest,omitempty"`
	SourceDigest string    `json:"source_digest,omitempty"`
	Size         int64     `json:"size,omitempty"`
	MediaType    string    `json:"media_type,omitempty"`
	Path         string    `json:"path,omitempty"`
	DoneBytes    int64     `json:"done_bytes,omitempty"`
	TotalBytes   int64     `json:"total_bytes,omitempty"`
	Error        string    `json:"error,omitempty"`
	Time         time.Time `json:"time"`
}

// Ready is the status of a stored image.
func (img Image) Ready(host string) Status {
	return Status{
		Host: host, Name: img.Name, State: StateReady, Source: img.Source, Digest: img.Digest,
		SourceDigest: img.SourceDigest, Size: img.Size, MediaType: img.MediaType, Path: img.Path, Time: time.Now().UTC(),
	}
}

// PullRequest is the body of vm.image.<host>.pull.
type PullRequest struct {
	Source string `json:"source"`
	Name   string `json:"name,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
}

// RemoveRequest is the body of vm.image.<host>.rm.
type RemoveRequest struct {
	Name string `json:"name"`
}
