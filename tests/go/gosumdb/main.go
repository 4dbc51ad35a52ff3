// gosumdb serves a checksum database for the tests, offline: the real
// server from golang.org/x/mod/sumdb over a test tree whose records are
// computed with the reference dirhash from a GOPROXY directory.
//
// Usage: gosumdb NAME PROXYDIR
// Prints the verifier key, then the listening address, one a line.
package main

import (
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"

	"golang.org/x/mod/module"
	"golang.org/x/mod/sumdb"
	"golang.org/x/mod/sumdb/dirhash"
	"golang.org/x/mod/sumdb/note"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: gosumdb NAME PROXYDIR")
		os.Exit(2)
	}
	name, root := os.Args[1], os.Args[2]
	skey, vkey, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		panic(err)
	}
	gosum := func(path, vers string) ([]byte, error) {
		escPath, err := module.EscapePath(path)
		if err != nil {
			return nil, err
		}
		escVers, err := module.EscapeVersion(vers)
		if err != nil {
			return nil, err
		}
		base := filepath.Join(root, filepath.FromSlash(escPath), "@v", escVers)
		zipHash, err := dirhash.HashZip(base+".zip", dirhash.Hash1)
		if err != nil {
			return nil, err
		}
		modHash, err := dirhash.Hash1([]string{"go.mod"}, func(string) (io.ReadCloser, error) {
			return os.Open(base + ".mod")
		})
		if err != nil {
			return nil, err
		}
		return []byte(fmt.Sprintf("%s %s %s\n%s %s/go.mod %s\n", path, vers, zipHash, path, vers, modHash)), nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	fmt.Println(vkey)
	fmt.Println(ln.Addr().String())
	panic(http.Serve(ln, sumdb.NewServer(sumdb.NewTestServer(skey, gosum))))
}
