// cnidrive: a cnitool-style driver over libcni, the library every CNI runtime uses
// (containerd's go-cni, cnitool, CRI-O's ocicni). pybridge's interop tests run it inside a
// throw-away "host" netns; `make cnitool` builds it for manual testing.
//
// Build offline (GOPATH mode, Debian's golang-go and golang-github-appc-cni-dev):
//
//	GO111MODULE=off GOPATH=$TMP/gopath:/usr/share/gocode GOCACHE=$TMP/gocache go build -o cnidrive .
//
// Usage, like cnitool (a network name looked up in the conf dir), or with a conflist file:
//
//	cnidrive [flags] add|check|del|cached|version|validate <network name | file.conflist> [netns path]
//
// Flags fall back to cnitool's environment variables: -confdir (NETCONFPATH, default
// /etc/cni/net.d), -cni-path (CNI_PATH), -cache-dir (CNI_CACHE_DIR, default libcni's
// /var/lib/cni), -id (default cnitool's "cnitool-" + sha512(netns)[:20]), -ifname (CNI_IFNAME,
// default eth0), -args (CNI_ARGS "K=V;K2=V2"), -cap (CAP_ARGS, a JSON object of capability
// args such as {"portMappings":[...],"ips":[...],"mac":"...","bandwidth":{...}}).
//
// add and cached print the result as libcni parsed (and cached) it, in the list's cniVersion.
//
// Built with -tags spec110 against libcni >= 1.2 (spec110.go), it also has status and gc
// (-valid, the valid attachments as a JSON list): libcni 1.1.2 has neither.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "cnidrive: "+format+"\n", a...)
	os.Exit(1)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func loadList(confDir, nameOrFile string) (*libcni.NetworkConfigList, error) {
	if _, err := os.Stat(nameOrFile); err != nil || !strings.ContainsRune(nameOrFile, '/') {
		// cnitool: a network name, looked up among the .conf/.conflist/.json files of the dir
		return libcni.LoadConfList(confDir, nameOrFile)
	}
	if strings.HasSuffix(nameOrFile, ".conflist") {
		return libcni.ConfListFromFile(nameOrFile)
	}
	conf, err := libcni.ConfFromFile(nameOrFile)
	if err != nil {
		return nil, err
	}
	return libcni.ConfListFromConf(conf)
}

func parseArgs(raw string) [][2]string {
	var out [][2]string
	for _, kv := range strings.Split(raw, ";") {
		if p := strings.SplitN(kv, "=", 2); len(p) == 2 {
			out = append(out, [2]string{p[0], p[1]})
		}
	}
	return out
}

// The verbs spec110.go adds when built with -tags spec110.
var extraCommands = map[string]func(ctx context.Context, cninet *libcni.CNIConfig, list *libcni.NetworkConfigList){}

func main() {
	confDir := flag.String("confdir", envOr("NETCONFPATH", "/etc/cni/net.d"), "conf dir to look the network up in")
	cniPath := flag.String("cni-path", envOr("CNI_PATH", "/opt/cni/bin"), "plugin dirs, colon separated")
	cacheDir := flag.String("cache-dir", os.Getenv("CNI_CACHE_DIR"), "libcni cache dir (empty: /var/lib/cni)")
	id := flag.String("id", "", "container ID (default: cnitool's, derived from the netns path)")
	ifName := flag.String("ifname", envOr("CNI_IFNAME", "eth0"), "interface name in the pod")
	cniArgs := flag.String("args", os.Getenv("CNI_ARGS"), "CNI_ARGS, K=V;K2=V2")
	capArgs := flag.String("cap", os.Getenv("CAP_ARGS"), "capability args as a JSON object")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline for the whole call")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s [flags] add|check|del|cached|version|validate|status|gc <network|file> [netns]\n",
			filepath.Base(os.Args[0]))
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 2 {
		flag.Usage()
		os.Exit(2)
	}
	cmd, target, netns := flag.Arg(0), flag.Arg(1), flag.Arg(2)

	list, err := loadList(*confDir, target)
	if err != nil {
		die("load %s: %v", target, err)
	}
	rt := &libcni.RuntimeConf{ContainerID: *id, NetNS: netns, IfName: *ifName, Args: parseArgs(*cniArgs)}
	if rt.ContainerID == "" {
		sum := sha512.Sum512([]byte(netns))
		rt.ContainerID = fmt.Sprintf("cnitool-%x", sum[:10])
	}
	if *capArgs != "" {
		if err := json.Unmarshal([]byte(*capArgs), &rt.CapabilityArgs); err != nil {
			die("-cap: %v", err)
		}
	}
	cninet := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(*cniPath), *cacheDir, nil)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	switch cmd {
	case "add":
		res, err := cninet.AddNetworkList(ctx, list, rt)
		if err != nil {
			die("ADD: %v", err)
		}
		_ = res.Print()
	case "check":
		if err := cninet.CheckNetworkList(ctx, list, rt); err != nil {
			die("CHECK: %v", err)
		}
	case "del":
		if err := cninet.DelNetworkList(ctx, list, rt); err != nil {
			die("DEL: %v", err)
		}
	case "cached":
		res, err := cninet.GetNetworkListCachedResult(list, rt)
		if err != nil {
			die("cached result: %v", err)
		}
		if res == nil {
			fmt.Println("null")
			return
		}
		_ = res.Print()
	case "version":
		out := map[string][]string{}
		for _, p := range list.Plugins {
			info, err := cninet.GetVersionInfo(ctx, p.Network.Type)
			if err != nil {
				die("VERSION %s: %v", p.Network.Type, err)
			}
			out[p.Network.Type] = info.SupportedVersions()
		}
		b, _ := json.Marshal(out)
		fmt.Println(string(b))
	case "validate":
		caps, err := cninet.ValidateNetworkList(ctx, list)
		if err != nil {
			die("validate: %v", err)
		}
		b, _ := json.Marshal(map[string]interface{}{"capabilities": caps})
		fmt.Println(string(b))
	default:
		run, ok := extraCommands[cmd]
		if !ok {
			die("unknown command %q", cmd)
		}
		run(ctx, cninet, list)
	}
}
