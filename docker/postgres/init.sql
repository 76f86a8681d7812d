-- The transport agency's database for the compose `postgres` profile:
-- a `trips` table of the demo's shape (connector/src/dev/demo.rs), its
-- rows generated here in SQL (200,000 journeys of 20,000 cards), and a
-- reader role for Sluice that may read it and nothing else. The reader's
-- password is the one the `pg-secret` service generated
-- (/run/sluice-db/password); the official image runs this file once, on
-- an empty data directory.
CREATE TABLE public.trips (
    trip_id     int8 NOT NULL,
    card_id     text NOT NULL,
    start_time  timestamptz NOT NULL,
    end_time    timestamptz NOT NULL,
    start_zone  text NOT NULL,
    end_zone    text NOT NULL,
    mode        text NOT NULL,
    distance_km float8 NOT NULL,
    fare_eur    float8 NOT NULL,
    age_band    text
);

INSERT INTO public.trips
SELECT id,
       'C' || lpad((1 + (id * 7919) % 20000)::text, 6, '0'),
       start_time,
       start_time + make_interval(mins => (5 + (id % 40))::int),
       'Z' || lpad((1 + (id * 31) % 40)::text, 2, '0'),
       'Z' || lpad((1 + (id * 17) % 40)::text, 2, '0'),
       (ARRAY['bus', 'bus', 'bus', 'tram', 'metro', 'metro', 'bike', 'ferry'])[1 + (id % 8)::int],
       round((0.5 + (id % 200) / 10.0)::numeric, 2)::float8,
       round((1.2 + (id % 200) / 80.0)::numeric, 2)::float8,
       (ARRAY['18-25', '26-35', '36-45', '46-55', '56-65', '66+', NULL])[1 + (id % 7)::int]
FROM (SELECT id, timestamptz '2026-01-01 05:00:00+00' + make_interval(secs => (id * 38.9)::float8) AS start_time
      FROM generate_series(1, 200000) AS id) AS g;

\set reader_password `cat /run/sluice-db/password`
CREATE ROLE sluice_reader LOGIN PASSWORD :'reader_password';
GRANT SELECT ON public.trips TO sluice_reader;
