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
	"maps"
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

// parse maps the rendered objects by kind, or by kind/name for a kind the
// chart renders more than once (the ConfigMaps of the configuration and of
// the dashboard).
func parse(t *testing.T, rendered string) map[string]object {
	t.Helper()
	var objs []object
	count := map[string]int{}
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
		objs = append(objs, o)
		count[keyOf(o)]++
	}
	byKey := map[string]object{}
	for _, o := range objs {
		key := keyOf(o)
		if count[key] > 1 {
			key += "/" + fmt.Sprint(get(o, "metadata", "name"))
		}
		if _, dup := byKey[key]; dup {
			t.Fatalf("two %s objects", key)
		}
		byKey[key] = o
	}
	return byKey
}

func kindOf(o object) string {
	kind, _ := o["kind"].(string)
	return kind
}

// keyOf is an object's kind, hook/kind for a Helm hook's (the uninstall
// hook's DaemonSet, Service and Job).
func keyOf(o object) string {
	if get(o, "metadata", "annotations", "helm.sh/hook") != nil {
		return "hook/" + kindOf(o)
	}
	return kindOf(o)
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
	objs := parse(t, rendered)
	validated := 0
	for _, o := range objs {
		if kind := kindOf(o); !slices.Contains(skip, kind) {
			validated++
			if !slices.Contains(kinds, kind) {
				kinds = append(kinds, kind)
			}
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
	want := fmt.Sprintf("Valid: %d, Invalid: 0, Errors: 0, Skipped: %d", validated, len(objs)-validated)
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
	var toml string
	for key, o := range objs {
		if kindOf(o) == "ConfigMap" && get(o, "data", "config.toml") != nil {
			if toml != "" {
				t.Fatalf("two ConfigMaps with config.toml (%s)", key)
			}
			toml, _ = get(o, "data", "config.toml").(string)
		}
	}
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
				for _, want := range []string{"--listen=127.0.0.1:5000", "--admin-listen=127.0.0.1:5001", "--peer-listen=[$(HOST_IP)]:5002",
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
				if _, ok := objs["ConfigMap/rp-registry-proxy-dashboard"]; ok || objs["ConfigMap"] == nil {
					t.Error("a dashboard ConfigMap by default")
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
					if get(m, "name") == "containerd-socket" && (get(m, "mountPath") != "/run/containerd" || get(m, "mountPropagation") != "HostToContainer") {
						t.Errorf("containerd's socket: %v; want its directory, the runtime's mounts below it followed", m)
					}
				}
				if mounts["containerd-socket"] != true || mounts["containerd-content"] != true {
					t.Errorf("containerd's socket and content directory not mounted read-only: %v", mounts)
				}
				// A node whose containerd keeps them elsewhere (k3s, RKE2)
				// still starts the pod: no type that checks the path exists.
				// The socket itself is never a hostPath: a missing one would
				// be created as a directory.
				for _, v := range get(spec, "volumes").([]any) {
					switch get(v, "name") {
					case "containerd-socket":
						if get(v, "hostPath", "path") != "/run/containerd" || get(v, "hostPath", "type") != "DirectoryOrCreate" {
							t.Errorf("containerd's socket volume: %v", v)
						}
					case "containerd-content":
						if get(v, "hostPath", "type") != "DirectoryOrCreate" {
							t.Errorf("containerd's content volume: %v", v)
						}
					}
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
				if !strings.Contains(args, "--admin-listen=[$(HOST_IP)]:5001") || !strings.Contains(args, "--log-level=debug") || !strings.Contains(args, "--shutdown-timeout=55s") {
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
		{
			name:   "uninstall hook",
			values: []string{"containerd.configPath=/etc/containerd/hosts.d", "containerd.registries={docker.io}", "nodeSelector.pool=gpu"},
			check: func(t *testing.T, objs map[string]object) {
				checkUninstallHook(t, objs, "/etc/containerd/hosts.d", "rp-registry-proxy-uninstall.kube-system.svc:8080")
			},
		},
		{
			name:   "no uninstall hook",
			values: []string{"containerd.cleanupOnUninstall=false"},
			check:  checkNoHooks,
		},
		{
			name:   "no uninstall hook without containerd.configure",
			values: []string{"containerd.configure=false"},
			check:  checkNoHooks,
		},
		{
			// The values docs/operator-guide.md gives for k3s.
			name: "k3s",
			values: []string{"containerd.configPath=/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
				"containerd.configFile=/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
				"containerd.contentStore.socket=/run/k3s/containerd/containerd.sock",
				"containerd.contentStore.contentDir=/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content"},
			check: func(t *testing.T, objs map[string]object) {
				spec := get(objs["DaemonSet"], "spec", "template", "spec")
				init := strings.Join(strs(get(spec, "initContainers", 0, "command")), " ")
				for _, want := range []string{"--config-path=/var/lib/rancher/k3s/agent/etc/containerd/certs.d", "--containerd-config=/host/containerd/config.toml"} {
					if !strings.Contains(init, want) {
						t.Errorf("init container lacks %s: %s", want, init)
					}
				}
				args := strings.Join(strs(get(spec, "containers", 0, "command")), " ")
				for _, want := range []string{"--containerd-address=/run/k3s/containerd/containerd.sock",
					"--containerd-content-dir=/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content"} {
					if !strings.Contains(args, want) {
						t.Errorf("serve lacks %s: %s", want, args)
					}
				}
				paths := map[string]any{}
				for _, v := range get(spec, "volumes").([]any) {
					paths[get(v, "name").(string)] = get(v, "hostPath", "path")
				}
				for name, want := range map[string]string{"containerd-certs": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
					"containerd-etc": "/var/lib/rancher/k3s/agent/etc/containerd"} {
					if paths[name] != want {
						t.Errorf("volume %s: host path %v, want %s", name, paths[name], want)
					}
				}
			},
		},
		{
			name:   "dashboard",
			values: []string{"dashboard.enabled=true"},
			check: func(t *testing.T, objs map[string]object) {
				cm := dashboardConfigMap(t, objs)
				if get(cm, "metadata", "namespace") != "kube-system" || get(cm, "metadata", "labels", "grafana_dashboard") != "1" ||
					get(cm, "metadata", "annotations") != nil {
					t.Errorf("dashboard ConfigMap's metadata: %v", get(cm, "metadata"))
				}
			},
		},
		{
			name: "dashboard elsewhere",
			values: []string{"dashboard.enabled=true", "dashboard.namespace=monitoring", "dashboard.label=grafana_dashboards",
				"dashboard.labelValue=yes", "dashboard.annotations.grafana_folder=Registry"},
			check: func(t *testing.T, objs map[string]object) {
				cm := dashboardConfigMap(t, objs)
				if get(cm, "metadata", "namespace") != "monitoring" || get(cm, "metadata", "labels", "grafana_dashboards") != "yes" ||
					get(cm, "metadata", "labels", "grafana_dashboard") != nil || get(cm, "metadata", "annotations", "grafana_folder") != "Registry" {
					t.Errorf("dashboard ConfigMap's metadata: %v", get(cm, "metadata"))
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

// dashboardConfigMap returns the dashboard's ConfigMap, having checked that it
// holds the chart's dashboard file, unchanged and valid JSON.
func dashboardConfigMap(t *testing.T, objs map[string]object) object {
	t.Helper()
	cm := objs["ConfigMap/rp-registry-proxy-dashboard"]
	if cm == nil {
		t.Fatalf("no dashboard ConfigMap among %v", slices.Sorted(maps.Keys(objs)))
	}
	want, err := os.ReadFile(filepath.Join(chart, "dashboards", "registry-proxy.json"))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := get(cm, "data", "registry-proxy.json").(string)
	if !json.Valid([]byte(got)) {
		t.Errorf("the ConfigMap's registry-proxy.json is not JSON:\n%.200s", got)
	}
	if got != string(want) {
		t.Errorf("the ConfigMap's registry-proxy.json (%d bytes) differs from the chart's dashboards/registry-proxy.json (%d bytes)", len(got), len(want))
	}
	return cm
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
	// Without the uninstall hook: kubectl would apply it with the rest and
	// undo the install at once.
	out, err := render(t, "registry-proxy", "kube-system", "clusterSecret.existingSecret=registry-proxy-secret", "containerd.cleanupOnUninstall=false")
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

var proxyBin = flag.String("proxy-bin", "", "registry-proxy binary for TestChartArgsLoad (built from ../cmd/registry-proxy when empty)")

// binary returns the registry-proxy binary: -proxy-bin, else one built now.
func binary(t *testing.T) string {
	t.Helper()
	if *proxyBin != "" {
		abs, err := filepath.Abs(*proxyBin)
		if err != nil {
			t.Fatal(err)
		}
		return abs
	}
	bin := filepath.Join(t.TempDir(), "registry-proxy")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/registry-proxy").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// nodeArgs returns the DaemonSet's serve command as the kubelet runs it on
// a node with hostIP: $(VAR) expanded from the container's env (each must
// be defined there), the ConfigMap's config.toml and a cluster secret as
// files of the test's, and bin for the image's binary.
func nodeArgs(t *testing.T, objs map[string]object, bin, hostIP string) []string {
	t.Helper()
	c := get(objs["DaemonSet"], "spec", "template", "spec", "containers", 0)
	env := map[string]string{}
	for _, e := range get(c, "env").([]any) {
		switch get(e, "valueFrom", "fieldRef", "fieldPath") {
		case "status.hostIP":
			env[get(e, "name").(string)] = hostIP
		case "spec.nodeName":
			env[get(e, "name").(string)] = "node-1"
		}
	}
	dir := t.TempDir()
	cfg, secret := filepath.Join(dir, "config.toml"), filepath.Join(dir, "cluster-secret")
	if err := os.WriteFile(cfg, []byte(get(objs["ConfigMap"], "data", "config.toml").(string)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secret, []byte(trust.NewSecret()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := strs(get(c, "command"))
	out := []string{bin}
	for _, a := range cmd[1:] {
		for strings.Contains(a, "$(") {
			i := strings.Index(a, "$(")
			j := strings.Index(a[i:], ")")
			if j < 0 {
				t.Fatalf("%s: $( without )", a)
			}
			v, ok := env[a[i+2:i+j]]
			if !ok {
				t.Fatalf("%s: $(...) not defined in the container's env %v", a, env)
			}
			a = a[:i] + v + a[i+j+1:]
		}
		switch {
		case strings.HasPrefix(a, "--config="):
			a = "--config=" + cfg
		case strings.HasPrefix(a, "--cluster-secret="):
			a = "--cluster-secret=" + secret
		}
		out = append(out, a)
	}
	return out
}

// The serve command the chart renders, on an IPv4 and on an IPv6 node, is
// accepted by the binary's own configuration check (serve --check-config:
// flags, config.toml, secret); the unbracketed IPv6 form it used to render
// is refused there with status 2.
func TestChartArgsLoad(t *testing.T) {
	bin := binary(t)
	for _, values := range [][]string{nil, {"admin.onNodeIP=true"}} {
		out, err := render(t, "rp", "kube-system", values...)
		if err != nil {
			t.Fatalf("helm template: %v\n%s", err, out)
		}
		objs := parse(t, out)
		for _, ip := range []string{"198.18.0.5", "fd00::5"} {
			t.Run(fmt.Sprintf("%v %s", values, ip), func(t *testing.T) {
				args := nodeArgs(t, objs, bin, ip)
				joined := strings.Join(args, " ")
				for _, want := range []string{"--peer-listen=[" + ip + "]:5002", "--node-id=node-1"} {
					if !strings.Contains(joined, want) {
						t.Errorf("args lack %s: %s", want, joined)
					}
				}
				out, err := exec.Command(args[0], append(args[1:], "--check-config")...).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "configuration valid") {
					t.Errorf("%s --check-config: %v\n%s", joined, err, out)
				}
				// The check can fail: the unbracketed address is refused.
				for i, a := range args {
					if strings.HasPrefix(a, "--peer-listen=") {
						args[i] = "--peer-listen=" + ip + ":5002"
					}
				}
				cmd := exec.Command(args[0], append(args[1:], "--check-config")...)
				out, err = cmd.CombinedOutput()
				wantErr := ip == "fd00::5"
				if got := cmd.ProcessState.ExitCode(); wantErr && (got != 2 || !strings.Contains(string(out), "p2p.peer_listen")) {
					t.Errorf("unbracketed IPv6 peer_listen: exit status %d, %s", got, out)
				} else if !wantErr && err != nil {
					t.Errorf("unbracketed IPv4 peer_listen: %v %s", err, out)
				}
			})
		}
	}
}

// checkUninstallHook: the post-delete hook runs containerd-config
// --uninstall on the nodes the release ran on, in pods that are not the
// release's, and a Job that waits for them comes after them; Helm deletes
// all three when it succeeds.
func checkUninstallHook(t *testing.T, objs map[string]object, configPath, endpoint string) {
	t.Helper()
	ds, svc, job := objs["hook/DaemonSet"], objs["hook/Service"], objs["hook/Job"]
	if ds == nil || svc == nil || job == nil {
		t.Fatalf("hook objects: DaemonSet %v, Service %v, Job %v", ds != nil, svc != nil, job != nil)
	}
	for _, o := range []object{ds, svc, job} {
		a := get(o, "metadata", "annotations")
		if get(a, "helm.sh/hook") != "post-delete" || !strings.Contains(fmt.Sprint(get(a, "helm.sh/hook-delete-policy")), "hook-succeeded") ||
			!strings.Contains(fmt.Sprint(get(a, "helm.sh/hook-delete-policy")), "before-hook-creation") {
			t.Errorf("%s %v: annotations %v", kindOf(o), get(o, "metadata", "name"), a)
		}
	}
	if w := get(job, "metadata", "annotations", "helm.sh/hook-weight"); w != "1" || get(ds, "metadata", "annotations", "helm.sh/hook-weight") != "0" ||
		get(svc, "metadata", "annotations", "helm.sh/hook-weight") != "0" {
		t.Errorf("the Job (weight %v) does not come after the DaemonSet and Service", w)
	}
	spec := get(ds, "spec", "template", "spec")
	init := strings.Join(strs(get(spec, "initContainers", 0, "command")), " ")
	if init != "/usr/local/bin/registry-proxy containerd-config --uninstall --config-path="+configPath {
		t.Errorf("cleanup init container: %s", init)
	}
	if c := strings.Join(strs(get(spec, "containers", 0, "command")), " "); !strings.Contains(c, "uninstall-wait --serve=:8080") {
		t.Errorf("cleanup container: %s", c)
	}
	if get(spec, "volumes", 0, "hostPath", "path") != configPath || get(spec, "initContainers", 0, "volumeMounts", 0, "mountPath") != configPath {
		t.Errorf("config path not mounted: %v", get(spec, "volumes"))
	}
	if get(spec, "containers", 0, "volumeMounts") != nil {
		t.Error("the answering container mounts the host")
	}
	main := get(objs["DaemonSet"], "spec", "template", "spec")
	for _, k := range []string{"nodeSelector", "tolerations", "priorityClassName"} {
		if fmt.Sprint(get(spec, k)) != fmt.Sprint(get(main, k)) {
			t.Errorf("cleanup pods' %s %v, the release's %v", k, get(spec, k), get(main, k))
		}
	}
	// The release's selectors (the peers' Service) must not take the
	// cleanup pods, and the hook Service must take them.
	labels := get(ds, "spec", "template", "metadata", "labels").(map[string]any)
	matches := func(sel any) bool {
		for k, v := range sel.(map[string]any) {
			if labels[k] != v {
				return false
			}
		}
		return true
	}
	if matches(get(objs["DaemonSet"], "spec", "selector", "matchLabels")) || matches(get(objs["Service"], "spec", "selector")) {
		t.Errorf("cleanup pods' labels %v match the release's selectors", labels)
	}
	if !matches(get(svc, "spec", "selector")) || !matches(get(ds, "spec", "selector", "matchLabels")) || get(svc, "spec", "publishNotReadyAddresses") != true {
		t.Errorf("hook Service %v does not select every cleanup pod %v", get(svc, "spec"), labels)
	}
	jspec := get(job, "spec", "template", "spec")
	if c := strings.Join(strs(get(jspec, "containers", 0, "command")), " "); !strings.Contains(c, "uninstall-wait --endpoint="+endpoint) {
		t.Errorf("wait Job: %s", c)
	}
	if get(job, "spec", "backoffLimit") != 0 || get(jspec, "restartPolicy") != "Never" {
		t.Errorf("wait Job retries: %v", get(job, "spec"))
	}
}

func checkNoHooks(t *testing.T, objs map[string]object) {
	t.Helper()
	for k := range objs {
		if strings.HasPrefix(k, "hook/") {
			t.Errorf("%s rendered", k)
		}
	}
}
