package api

import (
	"path"
	"regexp"
	"strings"
	"time"
)

// ImageState is where an image is on a host.
type ImageState string

const (
	ImagePulling ImageState = "pulling"
	ImageReady   ImageState = "ready"
	ImageFailed  ImageState = "failed"
)

// ImageStatus is the value of <host>.<name> in VM_IMAGES: what a worker's store
// holds or is pulling (schema image.json).
type ImageStatus struct {
	Host         string     `json:"host"`
	Name         string     `json:"name"`
	State        ImageState `json:"state"`
	Source       string     `json:"source"`
	Digest       string     `json:"digest,omitempty"`
	SourceDigest string     `json:"source_digest,omitempty"`
	Size         int64      `json:"size,omitempty"`
	MediaType    string     `json:"media_type,omitempty"`
	Path         string     `json:"path,omitempty"`
	DoneBytes    int64      `json:"done_bytes,omitempty"`
	TotalBytes   int64      `json:"total_bytes,omitempty"`
	Error        string     `json:"error,omitempty"`
	Time         time.Time  `json:"time"`
}

// ImagePullRequest is the body of vm.image.<host>.pull.
type ImagePullRequest struct {
	Source string `json:"source"`
	Name   string `json:"name,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
}

// ImageRemoveRequest is the body of vm.image.<host>.rm.
type ImageRemoveRequest struct {
	Name string `json:"name"`
}

var nameJunk = regexp.MustCompile(`[^a-z0-9_-]+`)

// ImageNameFrom derives an image name from a source: the file name without
// its extensions (…/debian-12-generic.qcow2.zst → debian-12-generic), or
// an OCI reference's last path element and tag (repo:12 → repo-12).
func ImageNameFrom(source string) string {
	s := source
	if rest, ok := strings.CutPrefix(s, "oci://"); ok {
		s = rest
		s, _, _ = strings.Cut(s, "@")
		repo, tag := s, ""
		if i := strings.LastIndexByte(s, ':'); i > strings.LastIndexByte(s, '/') {
			repo, tag = s[:i], s[i+1:]
		}
		s = path.Base(repo)
		if tag != "" && tag != "latest" {
			s += "-" + tag
		}
	} else {
		s, _, _ = strings.Cut(s, "?")
		s = path.Base(s)
		for _, ext := range []string{".zst", ".xz", ".gz", ".qcow2", ".img", ".raw", ".iso"} {
			s = strings.TrimSuffix(s, ext)
		}
	}
	s = strings.Trim(nameJunk.ReplaceAllString(strings.ToLower(s), "-"), "-_")
	if len(s) > MaxNameLen {
		s = s[:MaxNameLen]
	}
	return s
}
