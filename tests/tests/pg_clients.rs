//! The clients people run against PostgreSQL, through the agent, under the
//! shipped example policy (policy-examples/postgres-clients.toml): a
//! pg_dump | pg_restore round trip, pgbench's initialisation and prepared
//! runs, and an application on asyncpg (fetch, prepared statements, COPY,
//! a pool whose connections are given back and reused), psycopg 3 and
//! SQLAlchemy reflection.
use interlock_e2e::*;

const SETUP: &str = "
    CREATE ROLE app_owner LOGIN PASSWORD 'clients-secret';
    ALTER SCHEMA public OWNER TO app_owner;
    SET ROLE app_owner;
    CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL, name text);
    CREATE TABLE orders (id serial PRIMARY KEY,
                         customer_id int REFERENCES customers, total numeric(10, 2));
    INSERT INTO customers (email, name)
        SELECT 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, 50) g;
    INSERT INTO orders (customer_id, total) SELECT 1 + g % 50, g * 1.5 FROM generate_series(1, 200) g;
    CREATE INDEX orders_by_customer ON orders (customer_id);
    COMMENT ON TABLE orders IS 'one row per order';
";

/// The example policy, pointed at the test's cluster.
fn example_policy(pg: &Postgres, secret: &std::path::Path) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policy-examples/postgres-clients.toml"
    );
    std::fs::read_to_string(path)
        .unwrap()
        .replace("db.internal:5432", &pg.addr.to_string())
        .replace("tls = \"verify-full\"", "tls = \"disable\"")
        .replace("tls_ca_file = \"/etc/interlock/app-db-ca.pem\"\n", "")
        .replace(
            "/etc/interlock/secrets/app-db",
            &secret.display().to_string(),
        )
}

#[test]
fn real_clients_work_under_the_example_policy() {
    let pg = Postgres::start("clients", "127.0.0.63");
    pg.admin_sql("postgres", SETUP);
    pg.admin_sql("postgres", "CREATE DATABASE restored OWNER app_owner");
    let secret = pg.password_file("clients-secret");
    let mut cgroup = TestCgroup::new("pg-clients");
    let (app, _) = cgroup.child("orders-app.service");
    let agent = Agent::start(&cgroup, "pg-clients", &example_policy(&pg, &secret));
    let conn = format!("-h {} -p {} -U anyone", pg.addr.ip(), pg.addr.port());

    // Backups: pg_dump | pg_restore into a scratch database, data identical.
    let dump = agent.workdir.join("app.dump");
    let out = cgroup.sh(&format!(
        "pg_dump -Fc {conn} -d postgres -f {} && pg_restore --no-owner {conn} -d restored {}",
        dump.display(),
        dump.display()
    ));
    assert!(
        out.status.success(),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        agent.stderr()
    );
    let digest = "SELECT md5(string_agg(c.id || c.email || o.id || o.total, ',' ORDER BY o.id)) \
                  FROM orders o JOIN customers c ON c.id = o.customer_id";
    assert_eq!(
        pg.admin_sql("postgres", digest),
        pg.admin_sql("restored", digest)
    );
    assert_eq!(
        pg.admin_sql("restored", "SELECT obj_description('orders'::regclass)")
            .trim(),
        "one row per order"
    );

    // pgbench: initialisation (DROP, CREATE, COPY … FREEZE, VACUUM, keys)
    // and a prepared run.
    let out = cgroup.sh(&format!("pgbench -q -i -s 1 {conn} postgres 2>&1"));
    assert!(out.status.success(), "{}\n{}", stdout(&out), agent.stderr());
    let out = cgroup.sh(&format!(
        "pgbench -n -M prepared -c 2 -t 50 {conn} postgres"
    ));
    assert!(
        stdout(&out).contains("number of transactions actually processed: 100/100"),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        agent.stderr()
    );

    // The application's own clients, in its unit.
    let script = format!(
        r#"
import asyncio, asyncpg, psycopg, sqlalchemy
HOST, PORT = "{host}", {port}

async def with_asyncpg():
    conn = await asyncpg.connect(host=HOST, port=PORT, user="anyone", database="postgres")
    rows = await conn.fetch("SELECT id, email, name FROM customers WHERE id <= $1 ORDER BY id", 3)
    assert len(rows) == 3 and rows[0]["name"] == "User 1", rows
    # Masked: asyncpg reads binary results, where a masked column is NULL.
    assert rows[0]["email"] != "user1@example.com", rows[0]
    stmt = await conn.prepare("SELECT total FROM orders WHERE customer_id = $1 ORDER BY id")
    for customer in (1, 2, 3):
        assert len(await stmt.fetch(customer)) == 4
    copied = await conn.copy_records_to_table(
        "orders", records=[(1, 9.5), (2, 7.25)], columns=["customer_id", "total"])
    assert copied == "COPY 2", copied
    await conn.close()
    pool = await asyncpg.create_pool(host=HOST, port=PORT, user="anyone",
                                     database="postgres", min_size=1, max_size=1)
    for _ in range(5):
        async with pool.acquire() as c:
            await c.execute("LISTEN orders_changed")
            assert await c.fetchval("SELECT count(*) FROM orders") == 202
    await pool.close()

asyncio.run(with_asyncpg())

with psycopg.connect(host=HOST, port=PORT, user="anyone", dbname="postgres") as conn:
    total = conn.execute("SELECT sum(total) FROM orders WHERE customer_id = %s", (4,)).fetchone()[0]
    assert total > 0
    conn.execute("INSERT INTO orders (customer_id, total) VALUES (%s, %s)", (4, 1))

engine = sqlalchemy.create_engine(f"postgresql+psycopg2://anyone@{{HOST}}:{{PORT}}/postgres")
meta = sqlalchemy.MetaData()
meta.reflect(engine)
assert {{"customers", "orders"}} <= set(meta.tables), meta.tables.keys()
assert meta.tables["orders"].c.customer_id.foreign_keys
print("app ok")
"#,
        host = pg.addr.ip(),
        port = pg.addr.port()
    );
    let file = agent.workdir.join("app.py");
    std::fs::write(&file, script).unwrap();
    let out = sh_in(&app, &format!("exec /usr/bin/python3 {}", file.display()));
    assert!(
        stdout(&out).contains("app ok"),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        agent.stderr()
    );

    // The same application may not reach past its rules.
    let out = sh_in(
        &app,
        &format!("exec psql -X -w -q -t -A {conn} -d postgres -c 'DROP TABLE orders'"),
    );
    assert!(
        stderr(&out).contains("statement denied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) > 0 FROM orders")
            .trim(),
        "t"
    );
}
