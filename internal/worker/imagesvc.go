package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vmherd/vmherd/internal/jsetup"

	"github.com/vmherd/vmherd/api"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/vmherd/vmherd/internal/events"
	"github.com/vmherd/vmherd/internal/images"
	"github.com/vmherd/vmherd/internal/origin"
)

// imageService runs this host's image store for `vmctl image`: pulls on
// request, their status in VM_IMAGES (docs/contract.md, Images).
type imageService struct {
	w       *Worker
	store   *images.Store
	kv      jetstream.KeyValue
	ctx     context.Context
	cancel  context.CancelFunc
	mu      sync.Mutex
	pulling map[string]bool
	wg      sync.WaitGroup
}

// progressEvery bounds how often a pull's progress is written.
const imageProgressEvery = time.Second

// startImages opens VM_IMAGES, writes what the store holds, and adds the
// image endpoints to svc.
func (w *Worker) startImages(ctx context.Context, svc micro.Service) (*imageService, error) {
	if w.cfg.ImageStore == "" {
		return nil, nil
	}
	s := &imageService{w: w, store: &images.Store{Root: w.cfg.ImageStore, Policy: w.cfg.ImagePolicy}, pulling: map[string]bool{}}
	if err := jsetup.RetryStartup(ctx, w.log, "the images bucket", func(sctx context.Context) (err error) {
		s.kv, err = w.cfg.JS.KeyValue(sctx, w.cfg.Names.ImagesBucket())
		return err
	}); err != nil {
		return nil, fmt.Errorf("worker: opening %s: %w", w.cfg.Names.ImagesBucket(), err)
	}
	if err := s.sync(ctx); err != nil {
		w.log.Warn("publishing the image store's contents failed", "err", err)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	err := errors.Join(
		svc.AddEndpoint("image_pull", origin.Guard(w.log, micro.HandlerFunc(s.pull)), micro.WithEndpointSubject(w.cfg.Names.Image(w.cfg.Host, api.ImagePull))),
		svc.AddEndpoint("image_rm", origin.Guard(w.log, micro.HandlerFunc(s.remove)), micro.WithEndpointSubject(w.cfg.Names.Image(w.cfg.Host, api.ImageRemove))),
	)
	if err != nil {
		s.cancel()
		return nil, fmt.Errorf("worker: adding image endpoints: %w", err)
	}
	return s, nil
}

// stop cancels pulls in progress (they end failed) and waits for them.
func (s *imageService) stop() {
	if s == nil {
		return
	}
	s.cancel()
	s.wg.Wait()
}

func (s *imageService) put(ctx context.Context, st api.ImageStatus) {
	st.Host, st.Time = s.w.cfg.Host, time.Now().UTC()
	b, _ := json.Marshal(st)
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := s.kv.Put(pctx, api.ImageKey(s.w.cfg.Host, st.Name), b); err != nil {
		s.w.log.Warn("writing an image's status failed", "image", st.Name, "state", st.State, "err", err)
	}
}

// sync makes VM_IMAGES say what the store holds: every image ready, no
// key for an image that is gone, and pulls a previous run left
// unfinished failed.
func (s *imageService) sync(ctx context.Context) error {
	have, err := s.store.List()
	if err != nil {
		return err
	}
	byName := map[string]bool{}
	for _, img := range have {
		byName[img.Name] = true
		s.put(ctx, img.Ready(s.w.cfg.Host))
	}
	// Direct gets, not a KV watch: a worker may not create consumers.
	es, err := events.KVEntries(ctx, s.w.cfg.JS, s.kv.Bucket(), s.w.cfg.Host+".*")
	if err != nil {
		return err
	}
	for _, e := range es {
		key := e.Key()
		name := strings.TrimPrefix(key, s.w.cfg.Host+".")
		if byName[name] {
			continue
		}
		var st api.ImageStatus
		if json.Unmarshal(e.Value(), &st) == nil && st.State == api.ImagePulling {
			st.State, st.Error = api.ImageFailed, "the worker stopped during the pull; pull again"
			s.put(ctx, st)
		} else if st.State == api.ImageReady {
			_ = s.kv.Delete(ctx, key)
		}
	}
	return nil
}

func (s *imageService) pull(req micro.Request) {
	var pr api.ImagePullRequest
	dec := json.NewDecoder(strings.NewReader(string(req.Data())))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&pr); err != nil || pr.Source == "" {
		_ = req.Error("400", `request must be {"source":"http(s)://… or oci://…","name":"…","sha256":"…"}`, nil)
		return
	}
	if pr.Name == "" {
		pr.Name = api.ImageNameFrom(pr.Source)
	}
	if err := api.ValidateName(pr.Name); err != nil {
		_ = req.Error("400", fmt.Sprintf("image name: %v (give one with --name)", err), nil)
		return
	}
	s.mu.Lock()
	if s.pulling[pr.Name] {
		s.mu.Unlock()
		_ = req.Error("409", fmt.Sprintf("host %s is already pulling an image named %s", s.w.cfg.Host, pr.Name), nil)
		return
	}
	s.pulling[pr.Name] = true
	s.mu.Unlock()
	s.put(s.ctx, api.ImageStatus{Name: pr.Name, State: api.ImagePulling, Source: pr.Source, TotalBytes: -1})
	_ = req.RespondJSON(map[string]string{"host": s.w.cfg.Host, "name": pr.Name})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.pulling, pr.Name)
			s.mu.Unlock()
		}()
		var last time.Time
		img, err := s.store.Pull(s.ctx, pr.Source, images.PullOptions{Name: pr.Name, SHA256: pr.SHA256, Progress: func(done, total int64) {
			if time.Since(last) < imageProgressEvery {
				return
			}
			last = time.Now()
			s.put(s.ctx, api.ImageStatus{Name: pr.Name, State: api.ImagePulling, Source: pr.Source, DoneBytes: done, TotalBytes: total})
		}})
		// The final status is written even when the worker is stopping.
		fctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err != nil {
			s.w.log.Warn("image pull failed", "image", pr.Name, "source", pr.Source, "err", err)
			s.put(fctx, api.ImageStatus{Name: pr.Name, State: api.ImageFailed, Source: pr.Source, Error: err.Error()})
			return
		}
		s.w.log.Info("image pulled", "image", img.Name, "digest", img.Digest, "size", img.Size)
		s.put(fctx, img.Ready(s.w.cfg.Host))
	}()
}

func (s *imageService) remove(req micro.Request) {
	var rr api.ImageRemoveRequest
	if err := json.Unmarshal(req.Data(), &rr); err != nil || api.ValidateName(rr.Name) != nil {
		_ = req.Error("400", `request must be {"name":"<image name>"}`, nil)
		return
	}
	err := s.store.Remove(rr.Name, s.w.imageInUse)
	switch {
	case errors.Is(err, images.ErrNotFound):
		// Not in the store: a failed pull leaves only its status in
		// VM_IMAGES, and removing the image removes that.
		ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
		defer cancel()
		key := api.ImageKey(s.w.cfg.Host, rr.Name)
		var st api.ImageStatus
		if e, gerr := s.kv.Get(ctx, key); gerr == nil && json.Unmarshal(e.Value(), &st) == nil {
			switch st.State {
			case api.ImageFailed:
				if derr := s.kv.Delete(ctx, key, jetstream.LastRevision(e.Revision())); derr == nil {
					_ = req.RespondJSON(map[string]string{"host": s.w.cfg.Host, "name": rr.Name})
					return
				}
			case api.ImagePulling:
				_ = req.Error("409", fmt.Sprintf("host %s is pulling %s: wait for the pull to end", s.w.cfg.Host, rr.Name), nil)
				return
			}
		}
		_ = req.Error("404", fmt.Sprintf("host %s has no image named %s", s.w.cfg.Host, rr.Name), nil)
		return
	case err != nil:
		_ = req.Error("409", err.Error(), nil)
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	_ = s.kv.Delete(ctx, api.ImageKey(s.w.cfg.Host, rr.Name))
	_ = req.RespondJSON(map[string]string{"host": s.w.cfg.Host, "name": rr.Name})
}

// imageInUse reports whether a VM on this host has path as its image.
func (w *Worker) imageInUse(path string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, l := range w.vms {
		if l.spec == nil || l.spec.ImagePath == "" {
			continue
		}
		p, err := filepath.EvalSymlinks(l.spec.ImagePath)
		if err != nil {
			p = l.spec.ImagePath
		}
		if p == path {
			return true
		}
	}
	return false
}

// namedImage resolves spec.image to its file in this host's store.
func (w *Worker) namedImage(spec api.VmSpec) (string, error) {
	if w.cfg.ImageStore == "" || !w.cfg.Router.LocalImages(spec.Backend) {
		return "", fmt.Errorf("%w: spec.image %q needs this worker's image store, which backend %s does not read from; give spec.image_path", ErrImagePath, spec.Image, spec.Backend)
	}
	img, err := (&images.Store{Root: w.cfg.ImageStore}).Get(spec.Image)
	if err != nil {
		return "", fmt.Errorf("%w: spec.image: %v on host %s (vmctl image list shows what each host has)", ErrImagePath, err, w.cfg.Host)
	}
	return img.Path, nil
}
