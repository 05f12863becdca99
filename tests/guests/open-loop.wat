;; Hostile, a preview1 program written by hand: opens `f.txt` in its first
;; preopened directory (fd 3) until the host refuses, up to 100,000 times,
;; then prints how many opens succeeded, in decimal, on stdout.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; The file name at 0; the opened descriptor is written at 64; the iovec
  ;; at 96; the digits end at 256.
  (data (i32.const 0) "f.txt")
  (func (export "_start")
    (local $count i32)
    (local $at i32)
    (block $refused
      (loop $open
        ;; fd 3, no lookup flags, "f.txt", no open flags, read rights.
        (br_if $refused
          (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 5)
            (i32.const 0) (i64.const 2) (i64.const 2) (i32.const 0) (i32.const 64)))
        (local.set $count (i32.add (local.get $count) (i32.const 1)))
        (br_if $open (i32.lt_u (local.get $count) (i32.const 100000)))))
    ;; The count in decimal, written backwards from 256.
    (local.set $at (i32.const 256))
    (loop $digit
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at)
        (i32.add (i32.const 48) (i32.rem_u (local.get $count) (i32.const 10))))
      (local.set $count (i32.div_u (local.get $count) (i32.const 10)))
      (br_if $digit (i32.ne (local.get $count) (i32.const 0))))
    (i32.store (i32.const 96) (local.get $at))
    (i32.store (i32.const 100) (i32.sub (i32.const 256) (local.get $at)))
    (drop (call $fd_write (i32.const 1) (i32.const 96) (i32.const 1) (i32.const 104)))))
