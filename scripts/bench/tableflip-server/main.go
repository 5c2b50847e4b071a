// The tableflip peer of scripts/bench/run.sh: a Go net/http server that
// answers every request with "hello from tableflip pid N" and upgrades itself
// with Cloudflare's tableflip on SIGHUP, the way tableflip's documentation
// shows: the new process inherits the listener, calls Ready(), and the old
// one stops with http.Server.Shutdown (graceful: it closes idle keep-alive
// connections and waits for active ones).
//
// Built in GOPATH mode against Debian's golang-github-cloudflare-tableflip-dev:
//   GO111MODULE=off GOPATH=/usr/share/gocode:$TMP go build -o server .
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address")
	pidFile := flag.String("pid-file", "", "pid file (rewritten by the serving process)")
	drain := flag.Duration("drain-timeout", 30*time.Second, "Shutdown deadline")
	flag.Parse()

	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidFile, UpgradeTimeout: 60 * time.Second})
	if err != nil {
		log.Fatal(err)
	}
	defer upg.Stop()

	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGHUP)
		for range sig {
			if err := upg.Upgrade(); err != nil {
				log.Println("upgrade failed:", err)
			}
		}
	}()

	ln, err := upg.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	body := []byte(fmt.Sprintf("hello from tableflip pid %d\n", os.Getpid()))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})}
	go srv.Serve(ln)

	if err := upg.Ready(); err != nil {
		log.Fatal(err)
	}
	<-upg.Exit()

	ctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	srv.Shutdown(ctx)
}
