package cow

// How the FUSE rootfs uses a region (one per active snapshot):
//
//	r, err := cow.Open(filepath.Join(root, "regions", snapshotID), cow.Options{MaxSize: quota})
//
// Inode ids: the rootfs's inode number is the cow file id; hard links share
// it. Rename needs nothing here. Unlink of the last name with no open
// handle: r.Remove(ino) (the blocks become reusable after the next Sync).
//
// First open for write (or truncate/setattr size) of an image file:
//
//	f, err := r.File(ino)
//	if errors.Is(err, cow.ErrNotExist) {
//		f, err = r.Create(ino)
//		if err == nil { err = f.SetBase(entry.Size) }
//	}
//
// then serve that inode from f from now on (no more passthrough): the base
// reader is the CAS object (*os.File opened read-only, kept by the rootfs):
//
//	read:      f.ReadAt(p, off, obj)            (io.EOF at end, like os.File)
//	write:     f.WriteAt(p, off, obj)           (ENOSPC past the cap)
//	O_APPEND:  f.Append(p, obj)
//	setattr:   f.Truncate(size)                 (also O_TRUNC)
//	fallocate: f.Fallocate(mode, off, len, obj)
//	getattr:   f.Size(); blocks from len(f.Extents()) or r.Usage()
//	fsync, fdatasync, syncfs, O_SYNC writes: f.Sync() / r.Sync()
//	statfs:    r.Statfs()
//
// A new file created by the container: r.Create(ino), then the same calls
// with a nil base. Commit: for every id in r.Files(), f.Modified() tells
// whether it differs from its base and f.NewReader(obj) streams the merged
// bytes into the CAS. Snapshot usage: r.Usage() (O(1)).
//
// mmap with MAP_SHARED on a modified file arrives as WRITE requests from
// the kernel's writeback and needs nothing special.
