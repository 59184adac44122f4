from sslt_cli.cli import main

main()
