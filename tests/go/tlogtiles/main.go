// tlogtiles prints the tiles the go command reads to check a record, or
// one tree against another: sumdb.Client.checkRecord reads the record's
// stored hash through tlog.TileHashReader, sumdb.Client.checkTrees reads
// tlog.TreeHash of the older tree through a TileHashReader of the newer
// one, and ReadHashes asks its TileReader for the tiles. The tests
// compare contentcache's own computation with this one.
//
// Usage: tlogtiles < QUERIES
// Each input line is "HEIGHT RECORD SIZE" (the tiles that prove record
// RECORD in a tree of SIZE records) or "tree HEIGHT TREE SIZE" (the tiles
// that give the hash of the tree of TREE records in a tree of SIZE); each
// output line the paths of the tiles read for it, in the order they are
// asked for, space-separated (empty when none are read).
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
		var record, tree, size int64
		var err error
		r := &recorder{}
		if line := in.Text(); strings.HasPrefix(line, "tree ") {
			if _, err := fmt.Sscan(line[len("tree "):], &height, &tree, &size); err != nil {
				panic(err)
			}
			r.height = height
			_, err = tlog.TreeHash(tree, tlog.TileHashReader(tlog.Tree{N: size}, r))
			if tree == 0 && err == nil {
				err = errRecorded // the empty tree's hash needs no tile
			}
		} else {
			if _, err := fmt.Sscan(line, &height, &record, &size); err != nil {
				panic(err)
			}
			r.height = height
			reader := tlog.TileHashReader(tlog.Tree{N: size}, r)
			_, err = reader.ReadHashes([]int64{tlog.StoredHashIndex(0, record)})
		}
		if err != errRecorded {
			panic(fmt.Sprintf("%s: %v", in.Text(), err))
		}
		paths := make([]string, len(r.tiles))
		for i, tile := range r.tiles {
			paths[i] = tile.Path()
		}
		fmt.Fprintln(out, strings.Join(paths, " "))
	}
}
