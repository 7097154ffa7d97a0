fn main() {
    std::process::exit(stemforge::cli::main())
}
