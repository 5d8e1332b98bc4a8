// go-cni (the library containerd's CRI plugin uses) driving pybridge: Setup / Check / Remove.
//
// Compiled by tests/interop (GOPATH mode, Debian's golang-github-containerd-go-cni-dev) and run
// by test_libcni.py inside a throw-away host netns, in a private mount namespace whose
// /var/lib is a tmpfs: go-cni 1.1.7 has no cache-dir option, so libcni's cache
// (/var/lib/cni/results) lands there and never on the machine. Without the PYBRIDGE_GOCNI_*
// variables the tests skip.
package gocni_test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gocni "github.com/containerd/go-cni"
)

const (
	wantIP  = "10.66.0.40"
	wantMAC = "02:66:00:00:00:40"
)

func setting(t *testing.T, key string) string {
	v := os.Getenv(key)
	if v == "" {
		t.Skipf("%s not set: run through tests/interop/test_libcni.py", key)
	}
	return v
}

func labels(id string) []gocni.NamespaceOpts {
	// what containerd's CRI plugin sends (K8S_POD_* labels become CNI_ARGS)
	return []gocni.NamespaceOpts{gocni.WithLabels(map[string]string{
		"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "interop", "K8S_POD_NAME": id,
		"K8S_POD_INFRA_CONTAINER_ID": id, "K8S_POD_UID": "uid-" + id,
	})}
}

func newCNI(t *testing.T, withLo bool) gocni.CNI {
	opts := []gocni.Opt{
		gocni.WithPluginDir(filepath.SplitList(setting(t, "CNI_PATH"))),
		gocni.WithPluginConfDir(setting(t, "PYBRIDGE_GOCNI_CONFDIR")),
		gocni.WithPluginMaxConfNum(1),
		gocni.WithInterfacePrefix("eth"),
	}
	load := []gocni.Opt{gocni.WithDefaultConf}
	if withLo {
		// containerd's CRI: loopback (a 0.3.1 network) + the first conflist of the conf dir
		opts = append(opts, gocni.WithMinNetworkCount(2))
		load = []gocni.Opt{gocni.WithLoNetwork, gocni.WithDefaultConf}
	}
	n, err := gocni.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Load(load...); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if err := n.Status(); err != nil {
		t.Fatalf("Status: %v", err)
	}
	return n
}

func cacheFile(t *testing.T, id string) string {
	return filepath.Join("/var/lib/cni/results", setting(t, "PYBRIDGE_GOCNI_NETWORK")+"-"+id+"-eth0")
}

// The CRI path: RunPodSandbox -> Setup (with mac and ips capabilities), StopPodSandbox ->
// Remove, RemovePodSandbox -> Remove with an empty netns path.
func TestCRISetupRemove(t *testing.T) {
	ns := setting(t, "PYBRIDGE_GOCNI_NETNS_A")
	n := newCNI(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id := "gocni-cri"
	opts := append(labels(id),
		gocni.WithCapability("mac", wantMAC),
		gocni.WithCapability("ips", []string{wantIP + "/24"}))
	start := time.Now()
	res, err := n.Setup(ctx, id, ns, opts...)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Logf("Setup took %s", time.Since(start))
	eth0, ok := res.Interfaces["eth0"]
	if !ok || len(eth0.IPConfigs) != 1 {
		t.Fatalf("eth0 missing or without one IP: %+v", res.Interfaces)
	}
	if got := eth0.IPConfigs[0].IP.String(); got != wantIP {
		t.Errorf("eth0 IP %s, want the requested %s", got, wantIP)
	}
	if eth0.Mac != wantMAC {
		t.Errorf("eth0 MAC %s, want the requested %s", eth0.Mac, wantMAC)
	}
	if eth0.Sandbox != ns {
		t.Errorf("eth0 sandbox %q, want %q", eth0.Sandbox, ns)
	}
	if gw := eth0.IPConfigs[0].Gateway; !gw.Equal(net.ParseIP("10.66.0.1")) {
		t.Errorf("gateway %v", gw)
	}
	if lo, ok := res.Interfaces["lo"]; !ok || len(lo.IPConfigs) == 0 {
		t.Errorf("loopback network missing: %+v", res.Interfaces)
	}
	if _, err := os.Stat(cacheFile(t, id)); err != nil {
		t.Errorf("libcni did not cache the result: %v", err)
	}
	if err := n.Remove(ctx, id, ns, opts...); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if _, err := os.Stat(cacheFile(t, id)); !os.IsNotExist(err) {
		t.Errorf("cache entry left after Remove: %v", err)
	}
	if err := n.Remove(ctx, id, "", opts...); err != nil {
		t.Fatalf("second Remove with an empty netns: %v", err)
	}
}

// go-cni's Check (CHECK with the cached prevResult), without the 0.3.1 loopback network,
// which cannot CHECK; it must fail once the pod's address is gone.
func TestSetupCheckRemove(t *testing.T) {
	ns := setting(t, "PYBRIDGE_GOCNI_NETNS_B")
	n := newCNI(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id := "gocni-check"
	res, err := n.Setup(ctx, id, ns, labels(id)...)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	if err := n.Check(ctx, id, ns, labels(id)...); err != nil {
		t.Fatalf("Check right after Setup: %v", err)
	}
	addr := res.Interfaces["eth0"].IPConfigs[0].IP.String() + "/24"
	if out, err := exec.Command("nsenter", "--net="+ns, "ip", "addr", "del", addr, "dev", "eth0").CombinedOutput(); err != nil {
		t.Fatalf("ip addr del: %v %s", err, out)
	}
	err = n.Check(ctx, id, ns, labels(id)...)
	if err == nil || !strings.Contains(err.Error(), wantPrefix(addr)) {
		t.Errorf("Check after removing %s: %v", addr, err)
	}
	if err := n.Remove(ctx, id, ns, labels(id)...); err != nil {
		t.Fatalf("Remove: %v", err)
	}
}

func wantPrefix(addr string) string { return strings.SplitN(addr, "/", 2)[0] }
