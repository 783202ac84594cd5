// Corpus program: libstdc++ std::ofstream on managed files (the path
// torch.save(obj, "path") takes: fopen64 + ::write/::writev on fileno + lseek64 + fclose).
//   argv[1]: output directory (must exist)
//
// - an ofstream written in small and large pieces (large ones go out as writev of
//   the buffer plus the data), seekp(0) to patch a header, seekp(end), close();
// - an ofstream closed only by its destructor at the end of a scope;
// - a global ofstream destroyed during exit();
// - std::fstream in/out, and ifstream read-back compared in-process.
// Exit 1 on a failed self-check.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

static std::string outdir;
static std::ostringstream observed;

static std::string opath(const std::string &name) { return outdir + "/" + name; }

[[noreturn]] static void fail(const std::string &msg)
{
	std::cerr << "cxx_ofstream: " << msg << std::endl;
	std::exit(1);
}

static std::vector<char> pattern(size_t n, uint32_t seed)
{
	std::vector<char> v(n);
	uint32_t x = seed * 2654435761u + 7;
	for (size_t i = 0; i < n; i++) {
		x = x * 1664525u + 1013904223u;
		v[i] = static_cast<char>(x >> 24);
	}
	return v;
}

static void expect_pos(std::ostream &o, long long want, const std::string &what)
{
	long long p = static_cast<long long>(o.tellp());
	observed << what << " tellp " << p << "\n";
	if (p != want)
		fail(what + ": tellp=" + std::to_string(p) + " expected " + std::to_string(want));
}

static std::string slurp(const std::string &path)
{
	std::ifstream in(path, std::ios::binary);
	if (!in)
		fail("cannot open " + path + " for reading");
	std::ostringstream ss;
	ss << in.rdbuf();
	return ss.str();
}

static void check_size(const std::string &name, long long want)
{
	struct stat st;
	if (stat(opath(name).c_str(), &st) != 0)
		fail("stat " + name);
	observed << name << " stat st_size " << st.st_size << "\n";
	if (st.st_size != want)
		fail(name + ": st_size=" + std::to_string(st.st_size) + " expected " + std::to_string(want));
}

// Destroyed during exit(), after main returns.
static std::ofstream g_atexit;

static void report_stats()
{
	const char *path = std::getenv("ACKPT_TEST_STATS");
	if (!path)
		return;
	/* struct ackpt_stats (include/ackpt.h) plus room to grow: the library
	 * rejects a size smaller than its own struct. */
	struct {
		uint64_t bytes_staged, files, bytes_written, errors, ops_pending;
		double stall_seconds;
		int32_t active, helper_flags;
		double helper_cpu_seconds;
		uint64_t staging_bytes;
		char spare[256];
	} st;
	std::memset(&st, 0, sizeof st);
	auto get = reinterpret_cast<int (*)(void *, size_t)>(dlsym(RTLD_DEFAULT, "ackpt_get_stats"));
	FILE *f = std::fopen(path, "w");
	if (!f)
		fail("open stats file");
	if (!get) {
		std::fprintf(f, "{\"present\": 0}\n");
	} else {
		int rc = get(&st, sizeof st);
		std::fprintf(f,
			     "{\"present\": 1, \"rc\": %d, \"bytes_staged\": %llu, \"files\": %llu, "
			     "\"bytes_written\": %llu, \"errors\": %llu, \"ops_pending\": %llu, "
			     "\"stall_seconds\": %f, \"active\": %d, \"helper_flags\": %d, "
			     "\"staging_bytes\": %llu}\n",
			     rc, (unsigned long long)st.bytes_staged, (unsigned long long)st.files,
			     (unsigned long long)st.bytes_written, (unsigned long long)st.errors,
			     (unsigned long long)st.ops_pending, st.stall_seconds, st.active,
			     st.helper_flags, (unsigned long long)st.staging_bytes);
	}
	std::fclose(f);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		std::cerr << "usage: " << argv[0] << " OUTDIR\n";
		return 2;
	}
	outdir = argv[1];

	// 1. Header patched after the body.
	std::string expect;
	{
		std::ofstream out(opath("stream.bin"), std::ios::binary | std::ios::trunc);
		if (!out)
			fail("open stream.bin");
		std::string hdr(64, '\0');
		out.write(hdr.data(), static_cast<std::streamsize>(hdr.size()));
		expect += hdr;
		expect_pos(out, 64, "stream.bin after-placeholder");
		for (int i = 0; i < 2000; i++) {
			std::string s = "small record " + std::to_string(i) + "\n";
			out << s;
			expect += s;
		}
		auto big = pattern(6u << 20, 1);
		out.write(big.data(), static_cast<std::streamsize>(big.size()));
		expect.append(big.data(), big.size());
		auto mid = pattern(20000, 2);
		out.write(mid.data(), static_cast<std::streamsize>(mid.size()));
		expect.append(mid.data(), mid.size());
		expect_pos(out, static_cast<long long>(expect.size()), "stream.bin after-body");

		std::string real = "CXXHDR size=" + std::to_string(expect.size());
		real.resize(64, ' ');
		out.seekp(0);
		out.write(real.data(), 64);
		expect.replace(0, 64, real);
		expect_pos(out, 64, "stream.bin after-header-patch");
		out.seekp(0, std::ios::end);
		expect_pos(out, static_cast<long long>(expect.size()), "stream.bin after-seek-end");
		out << "END\n";
		expect += "END\n";
		out.flush();
		out.close();
		if (!out)
			fail("stream.bin stream in error state after close");
	}
	check_size("stream.bin", static_cast<long long>(expect.size()));
	if (slurp(opath("stream.bin")) != expect)
		fail("stream.bin read-back mismatch");

	// 2. Left to the destructor.
	std::string expect2;
	{
		std::ofstream out(opath("destructor.txt"));
		for (int i = 0; i < 5000; i++) {
			std::string s = "closed by the destructor " + std::to_string(i) + "\n";
			out << s;
			expect2 += s;
		}
	}
	if (slurp(opath("destructor.txt")) != expect2)
		fail("destructor.txt read-back mismatch");

	// 3. fstream in|out: write, seekg, read, overwrite.
	{
		std::fstream fs(opath("fstream.bin"), std::ios::in | std::ios::out | std::ios::binary |
							 std::ios::trunc);
		if (!fs)
			fail("open fstream.bin");
		auto data = pattern(300000, 3);
		fs.write(data.data(), static_cast<std::streamsize>(data.size()));
		fs.seekg(1000);
		std::vector<char> rb(5000);
		fs.read(rb.data(), 5000);
		if (!fs || std::memcmp(rb.data(), data.data() + 1000, 5000) != 0)
			fail("fstream.bin in-stream read-back mismatch");
		fs.seekp(299990);
		fs.write("0123456789ABCDEF", 16); // extends by 6
		expect_pos(fs, 300006, "fstream.bin after-extend");
	}
	check_size("fstream.bin", 300006);

	// 4. A global ofstream, destroyed during exit().
	g_atexit.open(opath("global.txt"));
	for (int i = 0; i < 1000; i++)
		g_atexit << "global stream line " << i << "\n";

	{
		std::ofstream o(opath("observed.txt"));
		o << observed.str();
	}
	report_stats();
	return 0;
}
