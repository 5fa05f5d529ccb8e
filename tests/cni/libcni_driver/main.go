// Command driver runs a CNI network list through libcni, the reference runtime library,
// as a container runtime would. Used by tests/cni/test_libcni_chain.py and bench/cni_add.py.
//
//	driver add|check|del <conflist-file> <netns-path> <containerID> <ifname> <cni_args>
//
// Plugins are looked up in $DRIVER_CNI_PATH (colon-separated); libcni's result cache lives in
// $DRIVER_CACHE_DIR (never the host's /var/lib/cni). <cni_args> is "K1=V1;K2=V2" (may be "").
// ADD prints the result JSON on stdout; every error goes to stderr with exit code 1.
//
// Build offline with Debian's golang-go and golang-github-appc-cni-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o driver .
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "driver: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 6 {
		return fmt.Errorf("usage: driver add|check|del <conflist-file> <netns-path> <containerID> <ifname> <cni_args>")
	}
	command, confFile, netns, containerID, ifname, cniArgs := args[0], args[1], args[2], args[3], args[4], args[5]
	paths := filepath.SplitList(os.Getenv("DRIVER_CNI_PATH"))
	if len(paths) == 0 {
		return fmt.Errorf("DRIVER_CNI_PATH is not set")
	}
	cacheDir := os.Getenv("DRIVER_CACHE_DIR")
	if cacheDir == "" {
		return fmt.Errorf("DRIVER_CACHE_DIR is not set (refusing to use the host's /var/lib/cni)")
	}
	list, err := libcni.ConfListFromFile(confFile)
	if err != nil {
		return fmt.Errorf("load %s: %w", confFile, err)
	}
	rt := &libcni.RuntimeConf{
		ContainerID: containerID,
		NetNS:       netns,
		IfName:      ifname,
		Args:        parseArgs(cniArgs),
		CacheDir:    cacheDir,
	}
	cni := libcni.NewCNIConfig(paths, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return fmt.Errorf("ADD: %w", err)
		}
		return result.Print()
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			return fmt.Errorf("CHECK: %w", err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			return fmt.Errorf("DEL: %w", err)
		}
	default:
		return fmt.Errorf("unknown command %q (want add, check or del)", command)
	}
	return nil
}

func parseArgs(text string) [][2]string {
	var pairs [][2]string
	for _, item := range strings.Split(text, ";") {
		if item == "" {
			continue
		}
		key, value, _ := strings.Cut(item, "=")
		pairs = append(pairs, [2]string{key, value})
	}
	return pairs
}
