from uniref.cli import main

main()
