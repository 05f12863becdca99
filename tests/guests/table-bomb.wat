;; Hostile, written by hand because Rust cannot emit `table.grow`: a step
;; whose `run` grows a table 1,000 elements at a time until the host refuses,
;; then traps. The initial table size is a placeholder the test fills in, so
;; the same guest also tries a huge table at instantiation.
(component
  (core module $m
    (memory (export "memory") 1)
    (table $t INITIAL funcref)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      i32.const 1024)
    (func (export "run") (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (loop $grow
        (br_if $grow
          (i32.ne (table.grow $t (ref.null func) (i32.const 1000)) (i32.const -1))))
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
