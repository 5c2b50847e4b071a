// A Go stdlib net/http server for `baton run`: it takes the listening
// socket at fd 3 (systemd socket activation), checks LISTEN_PID is its own
// pid, and shuts down gracefully on SIGTERM. No dependencies outside the
// standard library.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		log.Fatalf("LISTEN_PID=%q is not my pid %d", os.Getenv("LISTEN_PID"), os.Getpid())
	}
	f := os.NewFile(3, os.Getenv("LISTEN_FDNAMES"))
	ln, err := net.FileListener(f)
	if err != nil {
		log.Fatalf("fd 3: %v", err)
	}
	f.Close()
	generation, _ := strconv.Atoi(os.Getenv("BATON_GENERATION"))
	version := os.Getenv("APP_VERSION")
	if version == "" {
		version = "go-app"
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/version", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]interface{}{
			"pid": os.Getpid(), "generation": generation, "version": version,
		})
	})
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "ok")
	})
	// The keep-alive clients' target (GET, and POST with a body it reads).
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "hello from go generation %d pid %d\n", generation, os.Getpid())
	})
	srv := &http.Server{Handler: mux}
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			log.Fatalf("serve: %v", err)
		}
	}()
	log.Printf("go generation %d pid %d serving %s", generation, os.Getpid(), ln.Addr())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	log.Printf("go generation %d pid %d: stopping", generation, os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Printf("shutdown: %v", err)
	}
}
