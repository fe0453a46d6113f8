-- A non-negative integer as a protobuf varint: seven bits a byte, the lowest
-- first, the high bit set on every byte but the last. The charge statement
-- writes its request's stored reply with it, the balance after the debit
-- appended to the rest of the reply (encoded by the service), in the
-- statement that makes the debit.
--
-- PL/pgSQL, not SQL: a SQL function with a FROM clause is not inlined, and
-- its body was planned again at every run of the charge statement (about
-- 130 µs each); PL/pgSQL keeps its plans for the session (about 3 µs).
CREATE FUNCTION protobuf_varint(n BIGINT) RETURNS BYTEA
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
  encoded BYTEA := '';
  rest BIGINT := n;
BEGIN
  IF n < 0 THEN
    RAISE EXCEPTION 'protobuf_varint: % is negative', n;
  END IF;
  LOOP
    IF rest < 128 THEN
      RETURN encoded || set_byte('\x00'::bytea, 0, rest::int);
    END IF;
    encoded := encoded || set_byte('\x00'::bytea, 0, ((rest & 127) | 128)::int);
    rest := rest >> 7;
  END LOOP;
END
$$;
