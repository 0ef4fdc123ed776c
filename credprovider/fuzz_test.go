package credprovider

import (
	"encoding/json"
	"strings"
	"testing"
)

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte(`{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"p","matchImages":["*.io","127.0.0.1:5000/team"],"defaultCacheDuration":"0s","apiVersion":"credentialprovider.kubelet.k8s.io/v1","env":[{"name":"A","value":"b"}]}]}`))
	f.Add([]byte("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: CredentialProviderConfig\nproviders:\n- name: ..\n  matchImages: ['[']\n  defaultCacheDuration: -1h\n  apiVersion: x\n  tokenAttributes: {}\n"))
	f.Add([]byte("providers: [{name: a}, {name: a}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		provs, err := parseConfig(data)
		if err != nil {
			return
		}
		if len(provs) == 0 {
			t.Fatal("valid config without providers")
		}
		seen := map[string]bool{}
		for _, p := range provs {
			if p.name == "" || p.name == "." || p.name == ".." || strings.ContainsAny(p.name, "/ \x00") || seen[p.name] {
				t.Fatalf("accepted provider name %q", p.name)
			}
			seen[p.name] = true
			if len(p.matchImages) == 0 {
				t.Fatalf("provider %q without matchImages", p.name)
			}
			for _, m := range p.matchImages {
				if err := checkPattern(m); err != nil {
					t.Fatalf("accepted pattern %q: %v", m, err)
				}
			}
			if p.defaultCacheDuration < 0 || !validPluginAPIVersion(p.apiVersion) {
				t.Fatalf("accepted %+v", p)
			}
			for _, e := range p.env {
				if name, _, ok := strings.Cut(e, "="); !ok || name == "" {
					t.Fatalf("accepted env %q", e)
				}
			}
		}
	})
}

func FuzzParseResponse(f *testing.F) {
	auth := map[string][2]string{"registry.io": {"user", "s3cret!pass"}, "https://index.docker.io/v1/": {"", "tok"}, "*.k8s.io/team": {"a", "b"}}
	f.Add(resp(v1, "Registry", dur("5m"), auth))
	f.Add(resp(v1, "Image", nil, auth))
	f.Add(resp(v1, "Global", dur("-1s"), nil))
	f.Add(resp("credentialprovider.kubelet.k8s.io/v1beta1", "Image", nil, auth))
	f.Add([]byte(`{"apiVersion":"` + v1 + `","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"a.io":{"username":"u","password":12345}}}`))
	f.Add([]byte(`{"kind":"CredentialProviderResponse"`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, out []byte) {
		r, err := parseResponse(out, v1)
		if err != nil {
			// Errors never quote a credential. Only secrets with a character
			// no error text has are checked, so a secret that happens to be
			// a word of the error does not count.
			var lenient struct {
				Auth map[string]map[string]any `json:"auth"`
			}
			if json.Unmarshal(out, &lenient) == nil {
				for _, a := range lenient.Auth {
					for _, v := range a {
						if s, ok := v.(string); ok && len(s) >= 4 && strings.ContainsAny(s, "!#$%&*+<=>?@^`{|}~") && strings.Contains(err.Error(), s) {
							t.Fatalf("error %q quotes a credential", err)
						}
					}
				}
			}
			return
		}
		switch r.cacheKeyType {
		case keyImage, keyRegistry, keyGlobal:
		default:
			t.Fatalf("accepted cacheKeyType %q", r.cacheKeyType)
		}
		if r.cacheDuration != nil && *r.cacheDuration < 0 {
			t.Fatalf("negative cacheDuration %v", *r.cacheDuration)
		}
		for i, a := range r.auth {
			if a.url == nil || a.key == "" {
				t.Fatalf("auth entry %+v", a)
			}
			if i > 0 && len(a.key) > len(r.auth[i-1].key) {
				t.Fatalf("auth not most specific first: %q after %q", a.key, r.auth[i-1].key)
			}
		}
		// Picking never panics, whatever the keys.
		pickAuth(r.auth, "docker.io", "docker.io/library/nginx")
		pickAuth(r.auth, "registry.io", "registry.io/team/app")
	})
}

func FuzzMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"*.kubernetes.io", "abcde.kubernetes.io"},
		{"*.*.kubernetes.io", "abcde.xyz.kubernetes.io"},
		{"*", "localhost/team/app"},
		{"docker.io", "docker.io/library/nginx"},
		{"127.0.0.1:5000/team", "127.0.0.1:5000/team/app"},
		{"registry.io:8080/path", "registry.io:8080/path/image"},
		{"https://registry.io", "registry.io/x"},
		{"*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com/team/app"},
		{"[::1]:5000", "[::1]:5000/x"},
		{"[.io", "a.io"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, glob, target string) {
		ok := matchStr(glob, target)
		if ok {
			g, err1 := parseSchemeless(glob)
			u, err2 := parseSchemeless(target)
			if err1 != nil || err2 != nil {
				t.Fatalf("matched unparseable %q %q", glob, target)
			}
			gp, gport := splitURL(g)
			tp, tport := splitURL(u)
			if len(gp) != len(tp) || gport != tport || !strings.HasPrefix(u.Path, g.Path) {
				t.Fatalf("%q matched %q", glob, target)
			}
		}
		// A pattern without glob characters matches itself.
		if !strings.ContainsAny(glob, `*?[\`) && checkPattern(glob) == nil && !matchStr(glob, glob) {
			t.Fatalf("%q does not match itself", glob)
		}
	})
}
