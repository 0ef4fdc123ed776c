package credprovider

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// MaxResponseSize bounds a plugin's stdout: a response is a few hundred
// bytes, and a plugin gone wrong must not fill the node's memory.
const MaxResponseSize = 1 << 20

// maxStderr is how much of a failed plugin's stderr is kept for the log.
const maxStderr = 512

// waitDelay bounds how long a run waits for the plugin's stdout and stderr
// to close after the plugin exited or was killed: a child it left behind
// holding them must not hold the run.
const waitDelay = 500 * time.Millisecond

// Runner runs a credential provider plugin: bin with args and env (the
// whole environment), stdin written to it; it returns what the plugin wrote
// to stdout, at most MaxResponseSize bytes. It must return once ctx is done.
// Errors may be a *RunError to carry the start of the plugin's stderr.
type Runner interface {
	Run(ctx context.Context, bin string, args, env []string, stdin []byte) (stdout []byte, err error)
}

// RunError is a failed plugin run. Stderr is not part of Error(), so that
// the returned error can travel without carrying whatever the plugin wrote;
// it is logged once, bounded.
type RunError struct {
	Err    error
	Stderr []byte // at most the first 512 bytes
}

func (e *RunError) Error() string { return e.Err.Error() }
func (e *RunError) Unwrap() error { return e.Err }

// ExecRunner runs plugins as processes, as kubelet does, each in its own
// process group so that a timeout kills whatever the plugin started too.
type ExecRunner struct{}

var errStdoutTooLarge = fmt.Errorf("stdout exceeds %d bytes", MaxResponseSize)

// Run implements Runner.
func (ExecRunner) Run(ctx context.Context, bin string, args, env []string, stdin []byte) ([]byte, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(stdin)
	stdout := &limitBuffer{max: MaxResponseSize}
	stderr := &headBuffer{max: maxStderr}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		killGroup(cmd.Process.Pid)
		return nil
	}
	cmd.WaitDelay = waitDelay
	err := cmd.Run()
	if cmd.Process != nil && errors.Is(err, exec.ErrWaitDelay) {
		// The plugin exited but something it started still holds its
		// output: that is still in the plugin's group (which therefore
		// still exists, so its id cannot have been reused).
		killGroup(cmd.Process.Pid)
		if ctx.Err() == nil && cmd.ProcessState != nil && cmd.ProcessState.Success() {
			// The plugin itself answered and exited 0: its answer counts
			// (the copy of its stdout is over; a bad one fails parsing).
			err = nil
		}
	}
	switch {
	case stdout.overflow:
		err = errStdoutTooLarge
	case err == nil:
		return stdout.buf.Bytes(), nil
	case ctx.Err() != nil:
		err = fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return nil, &RunError{Err: err, Stderr: bytes.Clone(stderr.buf.Bytes())}
}

// killGroup kills the process group pid leads, and pid itself in case it
// left the group.
func killGroup(pid int) {
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// limitBuffer keeps up to max bytes; a write beyond fails, so that the
// copy from the plugin's stdout stops and the plugin gets EPIPE.
type limitBuffer struct {
	buf      bytes.Buffer
	max      int
	overflow bool
}

func (b *limitBuffer) Write(p []byte) (int, error) {
	if b.buf.Len()+len(p) > b.max {
		b.overflow = true
		return 0, errStdoutTooLarge
	}
	return b.buf.Write(p)
}

// headBuffer keeps the first max bytes and quietly drops the rest, so a
// chatty plugin is not killed by EPIPE on stderr.
type headBuffer struct {
	buf bytes.Buffer
	max int
}

func (b *headBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}

// request is the CredentialProviderRequest written to a plugin's stdin.
type request struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Image      string `json:"image"`
}

// Cache key types of a CredentialProviderResponse.
const (
	keyImage    = "Image"
	keyRegistry = "Registry"
	keyGlobal   = "Global"
)

// response is a parsed and checked CredentialProviderResponse.
type response struct {
	cacheKeyType string
	// cacheDuration is the plugin's, or nil when it sent none (then the
	// provider's defaultCacheDuration applies).
	cacheDuration *time.Duration
	auth          []authEntry // sorted by sortAuth
}

// quoteValue quotes v, a value of a plugin's stdout, for an error only if
// it is a value of the protocol: errors and logs never carry arbitrary
// stdout, which holds credentials.
func quoteValue(v string) string {
	switch {
	case v == "":
		return "(empty)"
	case validPluginAPIVersion(v), v == "CredentialProviderRequest", v == "CredentialProviderResponse",
		strings.EqualFold(v, keyImage), strings.EqualFold(v, keyRegistry), strings.EqualFold(v, keyGlobal):
		return fmt.Sprintf("%q", v)
	}
	return "(not shown)"
}

// plainField is what a field path of a JSON type error may look like to
// be quoted: JSON keys of the response (a registry host in auth).
var plainField = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// parseResponse parses a plugin's stdout as the CredentialProviderResponse
// to a request of apiVersion, checked as kubelet checks it. Its errors
// never quote the credentials.
func parseResponse(out []byte, apiVersion string) (*response, error) {
	if len(out) > MaxResponseSize {
		return nil, errStdoutTooLarge
	}
	var r struct {
		APIVersion    string  `json:"apiVersion"`
		Kind          string  `json:"kind"`
		CacheKeyType  string  `json:"cacheKeyType"`
		CacheDuration *string `json:"cacheDuration"`
		Auth          map[string]struct {
			Username string `json:"username"`
			Password string `json:"password"`
		} `json:"auth"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, jsonError(err)
	}
	if r.Kind != "CredentialProviderResponse" {
		return nil, fmt.Errorf("response kind %s is not CredentialProviderResponse", quoteValue(r.Kind))
	}
	if r.APIVersion != apiVersion {
		return nil, fmt.Errorf("response apiVersion %s does not match the request's %q", quoteValue(r.APIVersion), apiVersion)
	}
	resp := &response{cacheKeyType: r.CacheKeyType}
	switch r.CacheKeyType {
	case keyImage, keyRegistry, keyGlobal:
	case "":
		return nil, errors.New("response has no cacheKeyType")
	default:
		return nil, fmt.Errorf("response cacheKeyType %s is not Image, Registry or Global", quoteValue(r.CacheKeyType))
	}
	if r.CacheDuration != nil {
		d, err := time.ParseDuration(*r.CacheDuration)
		if err != nil {
			return nil, errors.New("response cacheDuration is not a duration")
		}
		// kubelet caches a negative duration as already expired.
		d = max(d, 0)
		resp.cacheDuration = &d
	}
	for k, a := range r.Auth {
		e, ok := newAuthEntry(k, upstream.Credential{Username: a.Username, Password: a.Password})
		if !ok {
			continue // kubelet ignores an unparseable key too
		}
		resp.auth = append(resp.auth, e)
	}
	sortAuth(resp.auth)
	return resp, nil
}

// jsonError describes a decoding error of a plugin's stdout without the
// values encoding/json may quote (a number given for a password).
func jsonError(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("response is not JSON (syntax error at byte %d)", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if !plainField.MatchString(field) {
			field = "(not shown)"
		}
		return fmt.Errorf("response field %s is not of type %s", field, te.Type)
	}
	return errors.New("response is not a CredentialProviderResponse JSON object")
}
