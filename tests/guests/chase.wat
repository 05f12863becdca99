;; Hostile, written by hand: a step whose `run` chases pointers through its
;; whole 64 MiB memory, sixteen dependent loads a turn, each a cache and
;; TLB miss for one unit of fuel. It lays out the chain first (a word at
;; every 4-byte offset naming the next, in an order that jumps across the
;; memory), then follows it until its timeout. The most time a slice of
;; fuel can take: what bounds how long a guest holds its thread.
(component
  (core module $m
    (memory (export "memory") 1024)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      i32.const 1024)
    (func (export "run") (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (local $i i32)
      (local $p i32)
      ;; word i holds the address of word (i * 1664525 + 1013904223) mod 2^24:
      ;; one cycle through all 2^24 words.
      (loop $lay
        (i32.store
          (i32.shl (local.get $i) (i32.const 2))
          (i32.shl
            (i32.and
              (i32.add (i32.mul (local.get $i) (i32.const 1664525)) (i32.const 1013904223))
              (i32.const 16777215))
            (i32.const 2)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $lay (i32.lt_u (local.get $i) (i32.const 16777216))))
      (loop $chase
        (local.set $p
          (i32.load (i32.load (i32.load (i32.load (i32.load (i32.load (i32.load (i32.load
          (i32.load (i32.load (i32.load (i32.load (i32.load (i32.load (i32.load (i32.load
            (local.get $p))))))))))))))))))
        (br $chase))
      unreachable))
  (core instance $i (instantiate $m))
  (type $context' (record
    (field "run-id" string)
    (field "step-id" string)
    (field "attempt" u32)
    (field "idempotency-key" string)
    (field "tenant" string)))
  (export $context "step-context" (type $context'))
  (type $error' (variant (case "retryable" string) (case "fatal" string)))
  (export $error "step-error" (type $error'))
  (func (export "run") (param "ctx" $context) (param "input" string) (result (result string (error $error)))
    (canon lift (core func $i "run") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))
