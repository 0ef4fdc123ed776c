// Command credplugin is a kubelet image credential provider plugin for
// tests: it reads a CredentialProviderRequest on stdin and answers a
// CredentialProviderResponse on stdout, with credentials read from files at
// each run (so tests can rotate them) and behaviour chosen by flags.
//
// Every flag may also be given in the environment as CREDPLUGIN_<NAME>
// (upper case, '-' as '_'), so a provider's env in the kubelet config can
// set it; a flag on the command line wins.
//
//	--username NAME          the username (default empty)
//	--username-file FILE     read the username from FILE (trailing newline dropped)
//	--password-file FILE     read the password from FILE (trailing newline dropped)
//	--password PASS          the password, if no --password-file
//	--cache-duration D       the response's cacheDuration ("2s"); empty omits it
//	--cache-key-type T       Image, Registry (default) or Global
//	--auth-key KEY           the auth map's key; default the request image's registry host
//	--api-version V          the response's apiVersion; default the request's
//	--fail                   exit 1 with a message on stderr
//	--hang                   sleep until killed
//	--count-file FILE        append a line to FILE at each run (before anything else)
//	--pid-file FILE          write this process's id to FILE at each run
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "credplugin:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("credplugin", flag.ContinueOnError)
	str := func(name, def, usage string) *string {
		if v, ok := os.LookupEnv(envName(name)); ok {
			def = v
		}
		return fs.String(name, def, usage)
	}
	boolean := func(name, usage string) *bool {
		def, _ := strconv.ParseBool(os.Getenv(envName(name)))
		return fs.Bool(name, def, usage)
	}
	username := str("username", "", "the username")
	usernameFile := str("username-file", "", "read the username from this file")
	passwordFile := str("password-file", "", "read the password from this file at each run")
	password := str("password", "", "the password, if no --password-file")
	cacheDuration := str("cache-duration", "", "the response's cacheDuration; empty omits it")
	cacheKeyType := str("cache-key-type", "Registry", "Image, Registry or Global")
	authKey := str("auth-key", "", "the auth key; default the image's registry host")
	apiVersion := str("api-version", "", "the response's apiVersion; default the request's")
	fail := boolean("fail", "exit 1 with a message on stderr")
	hang := boolean("hang", "sleep until killed")
	countFile := str("count-file", "", "append a line to this file at each run")
	pidFile := str("pid-file", "", "write the process id to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}

	if *countFile != "" {
		f, err := os.OpenFile(*countFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(f, "run")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if *pidFile != "" {
		if err := os.WriteFile(*pidFile, []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
			return err
		}
	}
	if *fail {
		return fmt.Errorf("failing as told (--fail)")
	}
	if *hang {
		time.Sleep(1 << 62)
	}

	var req struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Image      string `json:"image"`
	}
	if err := json.NewDecoder(stdin).Decode(&req); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	if req.Kind != "CredentialProviderRequest" || req.Image == "" {
		return fmt.Errorf("request: kind %q image %q: not a CredentialProviderRequest", req.Kind, req.Image)
	}
	if *usernameFile != "" {
		b, err := os.ReadFile(*usernameFile)
		if err != nil {
			return err
		}
		*username = strings.TrimRight(string(b), "\r\n")
	}
	if *passwordFile != "" {
		b, err := os.ReadFile(*passwordFile)
		if err != nil {
			return err
		}
		*password = strings.TrimRight(string(b), "\r\n")
	}
	key := *authKey
	if key == "" {
		key, _, _ = strings.Cut(req.Image, "/")
	}
	resp := map[string]any{
		"apiVersion":   req.APIVersion,
		"kind":         "CredentialProviderResponse",
		"cacheKeyType": *cacheKeyType,
		"auth":         map[string]any{key: map[string]string{"username": *username, "password": *password}},
	}
	if *apiVersion != "" {
		resp["apiVersion"] = *apiVersion
	}
	if *cacheDuration != "" {
		resp["cacheDuration"] = *cacheDuration
	}
	return json.NewEncoder(stdout).Encode(resp)
}

// envName is the environment variable of flag name.
func envName(name string) string {
	return "CREDPLUGIN_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}
