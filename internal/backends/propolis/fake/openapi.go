package fake

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/google/uuid"

	"github.com/vmherd/vmherd/internal/testenv/require"
)

// SpecEnv names an environment variable that points at the propolis-server
// OpenAPI document, overriding the default location.
const SpecEnv = "VMHERD_PROPOLIS_OPENAPI"

// specRel is where the document lives relative to the module root.
var specRel = filepath.Join("..", "shared", "propolis", "propolis-server.openapi.json")

// SpecPath returns where the propolis-server OpenAPI document is looked
// for: $VMHERD_PROPOLIS_OPENAPI, else ../shared/propolis/… next to the
// vmherd checkout (require.RepoRoot).
func SpecPath() string {
	if p := os.Getenv(SpecEnv); p != "" {
		return p
	}
	root, err := require.RepoRoot()
	if err != nil {
		return ""
	}
	return filepath.Join(root, specRel)
}

// Spec validates requests and answers against the propolis-server OpenAPI
// document.
type Spec struct {
	Path string
	doc  *openapi3.T
	opts []openapi3.SchemaValidationOption
}

var (
	specOnce sync.Once
	specVal  *Spec
	specErr  error
)

// LoadSpec loads the document at SpecPath once. It returns (nil, nil) when
// the file is absent: validation is then skipped.
func LoadSpec() (*Spec, error) {
	specOnce.Do(func() {
		p := SpecPath()
		if p == "" {
			return
		}
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			return
		}
		specVal, specErr = LoadSpecFile(p)
	})
	return specVal, specErr
}

// LoadSpecFile loads an OpenAPI document and registers the formats it uses
// (uuid and the unsigned integer widths), so values like cpus: 300 or a
// malformed UUID are rejected as the real server would.
func LoadSpecFile(path string) (*Spec, error) {
	l := openapi3.NewLoader()
	doc, err := l.LoadFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("loading the propolis-server OpenAPI document %s: %w", path, err)
	}
	doc.SetStringFormatValidator("uuid", openapi3.NewCallbackValidator(func(s string) error {
		if len(s) != 36 {
			return fmt.Errorf("%q is not a hyphenated UUID", s)
		}
		_, err := uuid.Parse(s)
		return err
	}))
	for name, max := range map[string]int64{"uint8": math.MaxUint8, "uint16": math.MaxUint16, "uint32": math.MaxUint32, "uint64": math.MaxInt64, "uint": math.MaxInt64} {
		doc.SetIntegerFormatValidator(name, openapi3.NewRangeFormatValidator(int64(0), max))
	}
	return &Spec{Path: path, doc: doc, opts: doc.GetSchemaValidationOptions()}, nil
}

// route finds the operation for an exact (untemplated) path.
func (s *Spec) route(method, path string) (*routers.Route, error) {
	item := s.doc.Paths.Value(path)
	if item == nil {
		return nil, fmt.Errorf("%s %s: no such path in the OpenAPI document", method, path)
	}
	op := item.GetOperation(method)
	if op == nil {
		return nil, fmt.Errorf("%s %s: no such operation in the OpenAPI document", method, path)
	}
	return &routers.Route{Spec: s.doc, Path: path, PathItem: item, Method: method, Operation: op}, nil
}

func (s *Spec) options() *openapi3filter.Options {
	return &openapi3filter.Options{
		MultiError:                        true,
		RejectWhenRequestBodyNotSpecified: true,
		SchemaValidationOptions:           s.opts,
		AuthenticationFunc:                openapi3filter.NoopAuthenticationFunc,
	}
}

// ValidateRequest checks a request (its query parameters and its body)
// against the document and returns the operation id.
func (s *Spec) ValidateRequest(ctx context.Context, r *http.Request, body []byte) (string, error) {
	rt, err := s.route(r.Method, r.URL.Path)
	if err != nil {
		return "", err
	}
	clone := r.Clone(ctx)
	clone.Body = io.NopCloser(bytes.NewReader(body))
	clone.ContentLength = int64(len(body))
	in := &openapi3filter.RequestValidationInput{Request: clone, Route: rt, Options: s.options()}
	return rt.Operation.OperationID, openapi3filter.ValidateRequest(ctx, in)
}

// ValidateResponse checks an answer against the document.
func (s *Spec) ValidateResponse(ctx context.Context, r *http.Request, status int, header http.Header, body []byte) error {
	rt, err := s.route(r.Method, r.URL.Path)
	if err != nil {
		return err
	}
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: r, Route: rt, Options: s.options()},
		Status:                 status,
		Header:                 header,
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true, SchemaValidationOptions: s.opts},
	}
	in.SetBodyBytes(body)
	return openapi3filter.ValidateResponse(ctx, in)
}
