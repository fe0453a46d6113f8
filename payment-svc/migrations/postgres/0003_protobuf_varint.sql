-- A non-negative integer as a protobuf varint: seven bits a byte, the lowest
-- first, the high bit set on every byte but the last. The charge statement
-- writes its request's stored reply with it, the balance after the debit
-- appended to the rest of the reply (encoded by the service), in the
-- statement that makes the debit.
CREATE FUNCTION protobuf_varint(n BIGINT) RETURNS BYTEA
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT string_agg(
           set_byte('\x00'::bytea, 0,
             (((n >> (7 * i)) & 127) | CASE WHEN (n >> (7 * (i + 1))) > 0 THEN 128 ELSE 0 END)::int),
           ''::bytea ORDER BY i)
  FROM generate_series(0, 9) AS i
  WHERE n >= 0 AND (i = 0 OR (n >> (7 * i)) > 0)
$$;
