;; Hostile, written by hand: a step whose `run` fills and copies its whole
;; 64 MiB memory over and over, a few instructions an iteration that each
;; move tens of MiB. Fuel must charge them by what they move, and the
;; timeout must stop them.
(component
  (core module $m
    (memory (export "memory") 1024)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      i32.const 1024)
    (func (export "run") (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (loop $again
        (memory.fill (i32.const 0) (i32.const 171) (i32.const 67108864))
        (memory.copy (i32.const 0) (i32.const 33554432) (i32.const 33554432))
        (br $again))
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
