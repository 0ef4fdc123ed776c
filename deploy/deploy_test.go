// Package deploy_test renders the Helm chart (helm template) for default
// and other values, validates every object against the Kubernetes API
// schemas (kubeconform, strict), checks what the nodes depend on, and that
// deploy/kubernetes/registry-proxy.yaml is the chart's rendering.
package deploy_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	yaml "go.yaml.in/yaml/v3"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

const (
	chart = "helm/registry-proxy"
	// kubernetesVersion is the API the objects are validated against: its
	// OpenAPI document comes from the k8s.io/kubernetes module.
	kubernetesVersion = "v1.34.2"
)

var (
	toolsDir = flag.String("tools-dir", "../.tools/bin", "directory holding helm and kubeconform")
	update   = flag.Bool("update", false, "rewrite deploy/kubernetes/registry-proxy.yaml from the chart")
)

func tool(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(*toolsDir, name)
	if _, err := os.Stat(p); err == nil {
		abs, _ := filepath.Abs(p)
		return abs
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found (scripts/install-deps.sh installs it)", name)
	}
	t.Skipf("%s not found: run scripts/install-deps.sh", name)
	return ""
}

// render runs helm template with the values given as --set pairs and
// returns its output, or its error output and the error.
func render(t *testing.T, release, namespace string, values ...string) (string, error) {
	t.Helper()
	args := []string{"template", release, chart, "--namespace", namespace}
	for _, v := range values {
		args = append(args, "--set", v)
	}
	var out, stderr bytes.Buffer
	cmd := exec.Command(tool(t, "helm"), args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return stderr.String(), err
	}
	return out.String(), nil
}

type object = map[string]any

func parse(t *testing.T, rendered string) map[string]object {
	t.Helper()
	byKind := map[string]object{}
	dec := yaml.NewDecoder(strings.NewReader(rendered))
	for {
		var o object
		err := dec.Decode(&o)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("rendered YAML: %v", err)
		}
		if o == nil {
			continue
		}
		kind, _ := o["kind"].(string)
		if _, dup := byKind[kind]; dup {
			t.Fatalf("two %s objects", kind)
		}
		byKind[kind] = o
	}
	return byKind
}

// get walks o by keys (string for maps, int for lists).
func get(o any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, _ := o.(map[string]any)
			o = m[k]
		case int:
			l, _ := o.([]any)
			if k >= len(l) {
				return nil
			}
			o = l[k]
		}
	}
	return o
}

func strs(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, fmt.Sprint(x))
	}
	return out
}

// schemas writes, for each kind, the JSON schema kubeconform reads
// ({kind}-{group}-{version}.json): the kind's definition from the
// Kubernetes OpenAPI document with every definition it refers to, objects
// closed to unknown fields, int-or-string and quantity as the API takes them.
func schemas(t *testing.T, kinds []string) string {
	t.Helper()
	cmd := exec.Command("go", "mod", "download", "-json", "k8s.io/kubernetes@"+kubernetesVersion)
	cmd.Dir = t.TempDir() // outside this module: nothing is added to go.mod
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go mod download k8s.io/kubernetes@%s: %v\n%s", kubernetesVersion, err, out)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download: %v %s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(mod.Dir, "api", "openapi-spec", "swagger.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Definitions map[string]map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	defs := doc.Definitions
	defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = map[string]any{"oneOf": []any{map[string]any{"type": "string"}, map[string]any{"type": "integer"}}}
	defs["io.k8s.apimachinery.pkg.api.resource.Quantity"] = map[string]any{"oneOf": []any{map[string]any{"type": "string"}, map[string]any{"type": "number"}}}
	for _, d := range defs {
		closeObjects(d)
	}
	dir := t.TempDir()
	for name, d := range defs {
		gvks, _ := d["x-kubernetes-group-version-kind"].([]any)
		for _, g := range gvks {
			gvk := g.(map[string]any)
			kind := gvk["kind"].(string)
			if !slices.Contains(kinds, kind) {
				continue
			}
			suffix := "-" + gvk["version"].(string)
			if group := gvk["group"].(string); group != "" {
				suffix = "-" + strings.Split(group, ".")[0] + suffix
			}
			reach := map[string]any{}
			collect(defs, name, reach)
			s, _ := json.Marshal(map[string]any{"$ref": "#/definitions/" + name, "definitions": reach})
			if err := os.WriteFile(filepath.Join(dir, strings.ToLower(kind)+suffix+".json"), s, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// closeObjects forbids unknown fields in every object schema with
// properties, as kubectl's strict validation does.
func closeObjects(v any) {
	switch x := v.(type) {
	case map[string]any:
		if _, ok := x["properties"]; ok {
			if _, set := x["additionalProperties"]; !set {
				x["additionalProperties"] = false
			}
		}
		for _, c := range x {
			closeObjects(c)
		}
	case []any:
		for _, c := range x {
			closeObjects(c)
		}
	}
}

func collect(defs map[string]map[string]any, name string, into map[string]any) {
	if _, ok := into[name]; ok {
		return
	}
	d := defs[name]
	into[name] = d
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			if ref, ok := x["$ref"].(string); ok {
				collect(defs, strings.TrimPrefix(ref, "#/definitions/"), into)
			}
			for _, c := range x {
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(d)
}

// validate runs kubeconform in strict mode over rendered, skipping kinds
// that are not part of Kubernetes (custom resources).
func validate(t *testing.T, rendered string, skip ...string) {
	t.Helper()
	out, err := kubeconform(t, rendered, skip...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubeconform: %s", out)
}

func kubeconform(t *testing.T, rendered string, skip ...string) (string, error) {
	t.Helper()
	var kinds []string
	for kind := range parse(t, rendered) {
		if !slices.Contains(skip, kind) {
			kinds = append(kinds, kind)
		}
	}
	dir := schemas(t, kinds)
	f := filepath.Join(t.TempDir(), "rendered.yaml")
	os.WriteFile(f, []byte(rendered), 0o644)
	args := []string{"-strict", "-summary", "-schema-location", dir + "/{{.ResourceKind}}{{.KindSuffix}}.json"}
	if len(skip) > 0 {
		args = append(args, "-skip", strings.Join(skip, ","))
	}
	out, err := exec.Command(tool(t, "kubeconform"), append(args, f)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("kubeconform: %w\n%s", err, out)
	}
	want := fmt.Sprintf("Valid: %d, Invalid: 0, Errors: 0, Skipped: %d", len(kinds), len(parse(t, rendered))-len(kinds))
	if !strings.Contains(string(out), want) {
		return "", fmt.Errorf("kubeconform: want %q:\n%s", want, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// The validation finds what the API server would refuse.
func TestSchemasCatchMistakes(t *testing.T) {
	good, err := render(t, "rp", "kube-system")
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, good)
	}
	for _, tc := range []struct{ name, from, to string }{
		{"unknown field", "hostNetwork: true", "hostNetwrk: true"},
		{"wrong type", "periodSeconds: 2", "periodSeconds: often"},
		{"unknown field of a Service", "publishNotReadyAddresses: true", "publishNotReady: true"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(good, tc.from) {
				t.Fatalf("%q not rendered", tc.from)
			}
			if _, err := kubeconform(t, strings.Replace(good, tc.from, tc.to, 1)); err == nil {
				t.Errorf("%q passed validation", tc.to)
			}
		})
	}
}

// checkConfig loads the ConfigMap's config.toml as registry-proxy does.
func checkConfig(t *testing.T, objs map[string]object) error {
	t.Helper()
	toml, _ := get(objs["ConfigMap"], "data", "config.toml").(string)
	p := filepath.Join(t.TempDir(), "config.toml")
	os.WriteFile(p, []byte(toml), 0o644)
	_, err := config.Load(p)
	return err
}

func TestChart(t *testing.T) {
	for _, tc := range []struct {
		name   string
		values []string
		skip   []string
		check  func(t *testing.T, objs map[string]object)
	}{
		{
			name: "defaults",
			check: func(t *testing.T, objs map[string]object) {
				ds := objs["DaemonSet"]
				spec := get(ds, "spec", "template", "spec")
				if get(spec, "hostNetwork") != true {
					t.Error("not on the host network")
				}
				c := get(spec, "containers", 0)
				args := strings.Join(strs(get(c, "command")), " ")
				for _, want := range []string{"--listen=127.0.0.1:5000", "--admin-listen=127.0.0.1:5001", "--peer-listen=$(HOST_IP):5002",
					"--join=dns:rp-registry-proxy-peers.kube-system.svc:5002", "--cluster-secret=/etc/registry-proxy/secret/cluster-secret", "--node-id=$(NODE_NAME)"} {
					if !strings.Contains(args, want) {
						t.Errorf("serve lacks %s: %s", want, args)
					}
				}
				if get(c, "readinessProbe", "httpGet", "path") != "/readyz" || get(c, "readinessProbe", "httpGet", "host") != "127.0.0.1" {
					t.Errorf("readiness probe: %v", get(c, "readinessProbe"))
				}
				if init := strings.Join(strs(get(spec, "initContainers", 0, "command")), " "); !strings.Contains(init, "containerd-config --config-path=/etc/containerd/certs.d") {
					t.Errorf("init container: %s", init)
				}
				if get(objs["Service"], "spec", "clusterIP") != "None" || get(objs["Service"], "spec", "publishNotReadyAddresses") != true {
					t.Errorf("peer service: %v", get(objs["Service"], "spec"))
				}
				enc, _ := get(objs["Secret"], "data", "cluster-secret").(string)
				secret, err := base64.StdEncoding.DecodeString(enc)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := trust.ParseSecrets(secret); err != nil {
					t.Errorf("generated cluster secret: %v", err)
				}
				if _, ok := objs["PodMonitor"]; ok {
					t.Error("a PodMonitor by default")
				}
				for _, want := range []string{"--containerd-address=/run/containerd/containerd.sock",
					"--containerd-content-dir=/var/lib/containerd/io.containerd.content.v1.content", "--containerd-namespace=k8s.io"} {
					if !strings.Contains(args, want) {
						t.Errorf("serve lacks %s: %s", want, args)
					}
				}
				mounts := map[string]any{}
				for _, m := range get(c, "volumeMounts").([]any) {
					mounts[get(m, "name").(string)] = get(m, "readOnly")
				}
				if _, ok := mounts["containerd-socket"]; !ok || mounts["containerd-content"] != true {
					t.Errorf("containerd's socket and (read-only) content directory not mounted: %v", mounts)
				}
			},
		},
		{
			name: "other values",
			values: []string{"clusterSecret.existingSecret=mine", "containerd.registries={docker.io,ghcr.io}", "admin.onNodeIP=true",
				"podMonitor.enabled=true", "image.tag=v1.2.3", "config.pieces.concurrency=8", "config.upstream.allow={registry.example.com}",
				"extraArgs={--log-level=debug}", "shutdownTimeoutSeconds=55"},
			skip: []string{"PodMonitor"}, // a custom resource: not in the Kubernetes API
			check: func(t *testing.T, objs map[string]object) {
				if _, ok := objs["Secret"]; ok {
					t.Error("a Secret rendered beside existingSecret")
				}
				spec := get(objs["DaemonSet"], "spec", "template", "spec")
				if get(spec, "terminationGracePeriodSeconds") != 60 {
					t.Errorf("grace period %v", get(spec, "terminationGracePeriodSeconds"))
				}
				for _, v := range get(spec, "volumes").([]any) {
					if get(v, "name") == "cluster-secret" && get(v, "secret", "secretName") != "mine" {
						t.Errorf("secret volume: %v", v)
					}
				}
				init := strings.Join(strs(get(spec, "initContainers", 0, "command")), " ")
				if !strings.Contains(init, "--registry=docker.io --registry=ghcr.io") {
					t.Errorf("init container: %s", init)
				}
				c := get(spec, "containers", 0)
				args := strings.Join(strs(get(c, "command")), " ")
				if !strings.Contains(args, "--admin-listen=$(HOST_IP):5001") || !strings.Contains(args, "--log-level=debug") || !strings.Contains(args, "--shutdown-timeout=55s") {
					t.Errorf("serve: %s", args)
				}
				if get(c, "readinessProbe", "httpGet", "host") != nil || get(c, "image") != "registry-proxy:v1.2.3" {
					t.Errorf("probe %v, image %v", get(c, "readinessProbe"), get(c, "image"))
				}
				if get(objs["PodMonitor"], "spec", "podMetricsEndpoints", 0, "port") != "admin" {
					t.Errorf("PodMonitor: %v", objs["PodMonitor"])
				}
			},
		},
		{
			name: "credential providers",
			values: []string{"privateRegistries.credentialProviders.enabled=true",
				"privateRegistries.credentialProviders.config=/var/lib/kubelet/credential-provider-config.yaml",
				"privateRegistries.credentialProviders.binDir=/var/lib/kubelet/credential-provider",
				"privateRegistries.credentialProviders.extraFiles={/etc/kubernetes/azure.json}",
				`config.access.registries.myacr\.azurecr\.io.mode=node`},
			check: func(t *testing.T, objs map[string]object) {
				spec := get(objs["DaemonSet"], "spec", "template", "spec")
				mounts := map[string]any{}
				for _, m := range get(spec, "containers", 0, "volumeMounts").([]any) {
					if get(m, "readOnly") != true && strings.HasPrefix(get(m, "name").(string), "credential-provider") {
						t.Errorf("%v mounted writable", m)
					}
					mounts[get(m, "mountPath").(string)] = get(m, "name")
				}
				for _, p := range []string{"/var/lib/kubelet/credential-provider-config.yaml", "/var/lib/kubelet/credential-provider", "/etc/kubernetes/azure.json"} {
					if mounts[p] == nil {
						t.Errorf("%s not mounted: %v", p, mounts)
					}
				}
				cfg := get(objs["ConfigMap"], "data", "config.toml").(string)
				for _, want := range []string{`bin_dir = "/var/lib/kubelet/credential-provider"`, `[access.registries."myacr.azurecr.io"]`, `mode = "node"`} {
					if !strings.Contains(cfg, want) {
						t.Errorf("config.toml lacks %s:\n%s", want, cfg)
					}
				}
			},
		},
		{
			name:   "containerd left alone",
			values: []string{"containerd.configure=false", "containerd.contentStore.enabled=false"},
			check: func(t *testing.T, objs map[string]object) {
				spec := get(objs["DaemonSet"], "spec", "template", "spec")
				if init := get(spec, "initContainers"); init != nil {
					t.Errorf("init containers: %v", init)
				}
				if args := strings.Join(strs(get(spec, "containers", 0, "command")), " "); !strings.Contains(args, "--containerd-address=none") {
					t.Errorf("containerd's content store served: %s", args)
				}
				for _, v := range get(spec, "volumes").([]any) {
					if n := get(v, "name").(string); strings.HasPrefix(n, "containerd") || strings.HasPrefix(n, "credential-provider") {
						t.Errorf("volume %s mounted", n)
					}
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := render(t, "rp", "kube-system", tc.values...)
			if err != nil {
				t.Fatalf("helm template: %v\n%s", err, out)
			}
			validate(t, out, tc.skip...)
			objs := parse(t, out)
			if err := checkConfig(t, objs); err != nil {
				t.Errorf("the ConfigMap's config.toml: %v", err)
			}
			tc.check(t, objs)
		})
	}
}

// Values that cannot work are refused, at rendering or by the config check.
func TestChartRefuses(t *testing.T) {
	out, err := render(t, "rp", "kube-system", "podMonitor.enabled=true")
	if err == nil || !strings.Contains(out, "podMonitor.enabled needs admin.onNodeIP") {
		t.Errorf("a PodMonitor of a loopback listener: %v %s", err, out)
	}
	out, err = render(t, "rp", "kube-system", "config.store.hihg_water=1GiB")
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	if err := checkConfig(t, parse(t, out)); err == nil || !strings.Contains(err.Error(), "hihg_water") {
		t.Errorf("a misspelt key in config: %v", err)
	}
}

// The plain manifests are the chart rendered for release registry-proxy in
// kube-system with a Secret the operator creates.
func TestPlainManifests(t *testing.T) {
	const path = "kubernetes/registry-proxy.yaml"
	out, err := render(t, "registry-proxy", "kube-system", "clusterSecret.existingSecret=registry-proxy-secret")
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, out)
	}
	want := "# Generated from deploy/helm/registry-proxy (go test ./deploy -update). Create the cluster secret first:\n" +
		"#   kubectl -n kube-system create secret generic registry-proxy-secret --from-literal=cluster-secret=\"$(registry-proxy secret)\"\n" + out
	if *update {
		os.MkdirAll(filepath.Dir(path), 0o755)
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Errorf("%s differs from the chart's rendering: go test ./deploy -update", path)
	}
}
