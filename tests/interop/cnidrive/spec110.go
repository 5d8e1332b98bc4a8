//go:build spec110

// status and gc, through libcni >= 1.2 (spec 1.1.0): libcni calls STATUS on every plugin of the
// list, and for gc first DELs each attachment of the network it has cached that -valid does not
// name, then calls GC on every plugin with the valid attachments.
package main

import (
	"context"
	"encoding/json"
	"flag"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

var validAttachments = flag.String("valid", "[]", `gc: the valid attachments, [{"containerID":"...","ifname":"eth0"}]`)

func init() {
	extraCommands["status"] = func(ctx context.Context, cninet *libcni.CNIConfig, list *libcni.NetworkConfigList) {
		if err := cninet.GetStatusNetworkList(ctx, list); err != nil {
			die("STATUS: %v", err)
		}
	}
	extraCommands["gc"] = func(ctx context.Context, cninet *libcni.CNIConfig, list *libcni.NetworkConfigList) {
		var valid []types.GCAttachment
		if err := json.Unmarshal([]byte(*validAttachments), &valid); err != nil {
			die("-valid: %v", err)
		}
		if err := cninet.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: valid}); err != nil {
			die("GC: %v", err)
		}
	}
}
