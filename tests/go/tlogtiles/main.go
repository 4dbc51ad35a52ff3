// tlogtiles prints the tiles the go command reads to check that a record
// is in a tree: sumdb.Client.checkRecord reads the record's stored hash
// through tlog.TileHashReader, and ReadHashes asks its TileReader for the
// tiles. The tests compare contentcache's own computation with this one.
//
// Usage: tlogtiles < QUERIES
// Each input line is "HEIGHT RECORD SIZE"; each output line the paths of
// the tiles read for it, in the order they are asked for, space-separated.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/mod/sumdb/tlog"
)

var errRecorded = errors.New("recorded")

// recorder is a TileReader that keeps the tiles asked for and returns
// none: ReadHashes plans every tile before it reads any.
type recorder struct {
	height int
	tiles  []tlog.Tile
}

func (r *recorder) Height() int { return r.height }

func (r *recorder) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	r.tiles = tiles
	return nil, errRecorded
}

func (r *recorder) SaveTiles([]tlog.Tile, [][]byte) {}

func main() {
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		var height int
		var record, size int64
		if _, err := fmt.Sscan(in.Text(), &height, &record, &size); err != nil {
			panic(err)
		}
		r := &recorder{height: height}
		reader := tlog.TileHashReader(tlog.Tree{N: size}, r)
		if _, err := reader.ReadHashes([]int64{tlog.StoredHashIndex(0, record)}); err != errRecorded {
			panic(fmt.Sprintf("%d %d %d: %v", height, record, size, err))
		}
		paths := make([]string, len(r.tiles))
		for i, tile := range r.tiles {
			paths[i] = tile.Path()
		}
		fmt.Fprintln(out, strings.Join(paths, " "))
	}
}
