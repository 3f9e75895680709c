package proxy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/containerd/log"
)

// Error codes of the OCI distribution spec (section "Error Codes").
const (
	codeBlobUnknown     = "BLOB_UNKNOWN"
	codeDigestInvalid   = "DIGEST_INVALID"
	codeManifestUnknown = "MANIFEST_UNKNOWN"
	codeManifestInvalid = "MANIFEST_INVALID"
	codeNameInvalid     = "NAME_INVALID"
	codeNameUnknown     = "NAME_UNKNOWN"
	codeSizeInvalid     = "SIZE_INVALID"
	codeUnauthorized    = "UNAUTHORIZED"
	codeDenied          = "DENIED"
	codeUnsupported     = "UNSUPPORTED"
	codeTooManyRequests = "TOOMANYREQUESTS"
	// Not in the spec's table; distribution answers internal failures with it.
	codeUnknown = "UNKNOWN"
)

// apiError is an error with the HTTP status and spec code it is answered with.
type apiError struct {
	Status  int
	Code    string
	Message string
	Err     error
}

func (e *apiError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Err)
	}
	return e.Code + ": " + e.Message
}

func (e *apiError) Unwrap() error { return e.Err }

func newErr(status int, code, msg string, err error) *apiError {
	return &apiError{Status: status, Code: code, Message: msg, Err: err}
}

var (
	errUnsupported = newErr(http.StatusMethodNotAllowed, codeUnsupported,
		"dupproxy is a read-only pull-through proxy: push and delete are not supported", nil)
	errNameInvalid = newErr(http.StatusBadRequest, codeNameInvalid, "invalid repository name", nil)
)

// writeError answers err in the spec's error JSON. Errors that are not
// apiErrors are internal (500) and logged; their text is still returned
// because it helps operators and carries no secrets.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		ae = newErr(http.StatusInternalServerError, codeUnknown, "internal error", err)
	}
	entry := log.G(r.Context()).WithError(err).WithField("status", ae.Status).WithField("path", r.URL.Path)
	if ae.Status >= 500 {
		entry.Error("request failed")
	} else {
		entry.Debug("request refused")
	}
	msg := ae.Message
	if ae.Err != nil {
		msg += ": " + ae.Err.Error()
	}
	body, _ := json.Marshal(map[string]any{"errors": []map[string]any{{"code": ae.Code, "message": msg}}})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	if ae.Status == http.StatusUnauthorized && w.Header().Get("WWW-Authenticate") == "" {
		w.Header().Set("WWW-Authenticate", `Basic realm="dupproxy"`)
	}
	w.WriteHeader(ae.Status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}
