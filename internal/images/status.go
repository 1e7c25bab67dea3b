package images

import (
	"time"

	"github.com/vmherd/vmherd/api"
)

// Ready is the status of a stored image.
func (img Image) Ready(host string) api.ImageStatus {
	return api.ImageStatus{
		Host: host, Name: img.Name, State: api.ImageReady, Source: img.Source, Digest: img.Digest,
		SourceDigest: img.SourceDigest, Size: img.Size, MediaType: img.MediaType, Path: img.Path, Time: time.Now().UTC(),
	}
}
